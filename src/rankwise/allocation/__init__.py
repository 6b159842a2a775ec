"""Where the parameter budget goes: the budget solver, importance curves, measured sensitivity,
the plan of a run. Imports calibration, methods, model, core.
"""
