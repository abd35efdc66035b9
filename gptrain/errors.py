"""Errors caused by bad input. The CLI prints them as one line, without a traceback."""


class GptrainError(ValueError):
    """Bad input: the message names the file, key or value at fault."""
