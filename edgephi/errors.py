"""Errors a user can cause: the CLI prints them as one line, without a traceback."""


class EdgephiError(Exception):
    """Bad input or an unusable file; the message names the file and the problem."""


class ModelFormatError(EdgephiError):
    """A model folder that edgephi cannot read."""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP while an output folder is staged: a KeyboardInterrupt, so the cleanup
    that Ctrl-C runs runs too; signum says which signal."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
