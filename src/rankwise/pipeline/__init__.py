"""Compression orchestration: statistics, ranks, factors and the per-layer loop, then saving.
Imports allocation, calibration, methods, storage, model, data, core.
"""
