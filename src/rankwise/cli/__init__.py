"""The `rankwise` command: one typer app; the commands orchestrate the stages below and print.
Imports everything; nothing imports it.
"""
