"""Measuring a model: perplexity, encoder checks, lm-evaluation-harness tasks, speed.
Imports storage, calibration, model, data, core.
"""
