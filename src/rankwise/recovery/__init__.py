"""Distillation into the factors, its checkpoints and teacher cache, and truncation of trained
factors. Imports pipeline, storage, model, data, core.
"""
