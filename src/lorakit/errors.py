"""Errors lorakit raises on bad input. Each message is one line naming the file, key or module at fault.

The CLI prints `error: <message>` for these (exit 1), with the traceback only under `--debug`.
"""


class LorakitError(Exception):
    """Base class: a problem with the user's input or environment, not a bug in lorakit."""


class AdapterFileError(LorakitError):
    """An adapter or checkpoint file is missing, corrupt, unsafe or does not fit the model."""


class DataError(LorakitError):
    """A dataset file is malformed; the message names the file and line."""


class MissingDependencyError(LorakitError):
    """An optional package is needed; the message says how to install it."""
