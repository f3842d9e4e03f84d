"""Entry point of `lorakit` / `python -m lorakit`.

Errors in the user's input print one line (`error: ...`) and exit 1; usage errors exit 2; `--debug`
anywhere on the command line shows the traceback instead.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from typing import NoReturn

import typer

from lorakit.cli.app import app
from lorakit.errors import LorakitError

# Importing the command modules registers their commands on `app`.
from lorakit.cli import commands  # noqa: E402,F401  isort: skip

USER_ERRORS = (LorakitError, ValueError, FileNotFoundError, FileExistsError, PermissionError,
               IsADirectoryError, NotADirectoryError, OSError)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if debug:
        args.remove("--debug")
    command = typer.main.get_command(app)
    error = None
    try:
        # standalone mode: Click reports usage errors itself (exit 2) and ends every run with SystemExit.
        command.main(args=args, prog_name="lorakit", standalone_mode=True)
        code = 0
    except SystemExit as done:
        if not isinstance(done.code, (int, type(None))):  # a message to print: Python's own exit does that
            close_process_group()
            raise
        code = done.code or 0
    except USER_ERRORS as err:
        if debug:
            close_process_group()
            raise
        error, code = f"error: {one_line(err)}", 1
    except BaseException:
        close_process_group()
        raise
    if error is not None:
        # Printed once the exception and its frames are gone, so that what they held (a progress bar
        # closing itself) prints first and the error is the last line.
        gc.collect()
        print(error, file=sys.stderr)
    finish_process(code)


def close_process_group() -> bool:
    """Tear down the process group of a `torchrun`/`accelerate launch` run, if this process has one; returns
    whether it had."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    dist.destroy_process_group()
    return True


def finish_process(code: int) -> NoReturn:
    """End the process with exit status `code`, its output flushed.

    A process that ran under `torchrun` ends without the interpreter's teardown (`os._exit`): with torch
    2.13, gloo's worker threads outlive `destroy_process_group` after DDP or FSDP training (the C++ side
    keeps the group alive; checked by listing /proc/self/task), and a normal exit races them against C++
    static destructors, which now and then aborts a process that has finished and saved ("terminate called
    without an active exception", SIGABRT). Trackers and files are closed by then; logging is shut down
    here."""
    if close_process_group():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def one_line(err: BaseException) -> str:
    """The message of an error as one line; OS errors name their file ("x.json: Permission denied")."""
    if isinstance(err, OSError) and not isinstance(err, LorakitError) and err.strerror:
        return f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
