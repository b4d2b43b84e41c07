"""Errors a user can cause: the CLI prints them as one line, without a traceback."""


class EdgephiError(Exception):
    """Bad input or an unusable file; the message names the file and the problem."""


class ModelFormatError(EdgephiError):
    """A model folder that edgephi cannot read."""
