"""The model as torch and transformers hold it: loading dense models, the built-in target lists,
the factorized layer types, nn helpers, accounting of parameters. Imports core.
"""
