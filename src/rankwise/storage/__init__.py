"""Compressed models on disk: the saved directory, its manifest, the merge decision, and every
model source by name. Imports model, core.
"""
