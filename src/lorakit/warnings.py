"""Warning and error classes with PEFT's names, so `except` clauses and warning filters written for PEFT
catch lorakit's.

`PeftWarning` is what PEFT warns with for its own notices (a UserWarning); lorakit warns with it where PEFT
does. `PeftError` is lorakit's base error (`LorakitError`) under PEFT's name.
"""

from __future__ import annotations

from lorakit.errors import LorakitError


class PeftWarning(UserWarning):
    """A notice about how an adapter is set up or used (PEFT's category for its own warnings)."""


PeftError = LorakitError

__all__ = ["PeftError", "PeftWarning"]
