"""Tables, plots and the HTML report of compressed models. Imports evaluation, storage,
recovery, model, core.
"""
