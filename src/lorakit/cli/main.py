"""Entry point of `lorakit` / `python -m lorakit`.

Errors in the user's input print one line (`error: ...`) and exit 1; usage errors exit 2; `--debug`
anywhere on the command line shows the traceback instead.
"""

from __future__ import annotations

import sys

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
    try:
        # standalone mode: Click reports usage errors itself (exit 2) and lets other exceptions through.
        command.main(args=args, prog_name="lorakit", standalone_mode=True)
    except USER_ERRORS as err:
        if debug:
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        sys.exit(1)
    finally:
        close_process_group()


def close_process_group() -> None:
    """Tear down the process group of a `torchrun`/`accelerate launch` run before the interpreter exits:
    left to exit, gloo's worker threads can abort the process ("terminate called without an active
    exception") after the run has finished and saved."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def one_line(err: BaseException) -> str:
    """The message of an error as one line; OS errors name their file ("x.json: Permission denied")."""
    if isinstance(err, OSError) and not isinstance(err, LorakitError) and err.strerror:
        return f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
