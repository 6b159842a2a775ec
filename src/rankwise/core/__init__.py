"""The foundation every stage stands on: the recipe, the errors a user can cause, the hardware's
compute dtype, progress reporting and atomic writes. Imports nothing else of rankwise.
"""
