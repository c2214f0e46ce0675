"""Errors the command line reports as a clear message and a non-zero exit, without a traceback."""


class HorizonError(Exception):
    """A problem with the user's input, files or run that has a plain-language explanation."""
