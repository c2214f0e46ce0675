"""Errors the command line reports as a clear message and a non-zero exit, without a traceback."""


class HorizonError(Exception):
    """A problem with the user's input, files or run that has a plain-language explanation."""


class Stopped(HorizonError):
    """A run the user stopped (Ctrl-C, SIGTERM) after saving its work: the command line reports it
    as a stop, not an error, and exits with ``exit_code``."""

    exit_code: int = 130
