"""Statistics from running the model on calibration text: the block-by-block runner, grams,
sequential and staged calibration, the output Fisher. Imports model, data, methods, core.
"""
