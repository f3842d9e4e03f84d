"""Errors lorakit raises on bad input. Each message is one line naming the file, key or module at fault.

The CLI prints `error: <message>` for these (exit 1), with the traceback only under `--debug`.
"""


class LorakitError(Exception):
    """Base class: a problem with the user's input or environment, not a bug in lorakit."""


class AdapterFileError(LorakitError, ValueError):
    """An adapter or checkpoint file is missing, corrupt, unsafe or does not fit the model.

    Also a ValueError: what PEFT raises for an adapter it cannot read or place, so `except` clauses written
    for PEFT catch it."""


class AdapterShapeError(AdapterFileError, RuntimeError):
    """A saved tensor's shape does not fit the model's. Also a RuntimeError, what PEFT (torch's
    `load_state_dict`) raises for a size mismatch."""


class ConfigKindError(LorakitError, TypeError, ValueError):
    """A JSON file that is not a LoRA config (unknown keys and no `peft_type`). A TypeError, as PEFT raises
    there, and a ValueError like every other config problem."""


class DataError(LorakitError):
    """A dataset file is malformed; the message names the file and line."""


class MissingDependencyError(LorakitError):
    """An optional package is needed; the message says how to install it."""
