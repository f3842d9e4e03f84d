"""The `lorakit` command: a Typer app (help generated from type hints) with YAML config files.

Every command takes `--config FILE.yaml`; its keys are the command's options (dash or underscore form)
and flags given on the command line override them (Click's `default_map`).
"""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(
    name="lorakit",
    help="LoRA fine-tuning: train, merge, inspect and serve adapters (PEFT-compatible).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root() -> None:
    """LoRA fine-tuning: train, merge, inspect and serve adapters (PEFT-compatible). Add --debug for tracebacks."""


def _load_config(ctx: typer.Context, param: typer.CallbackParam, value: Path | None) -> Path | None:
    """Read a YAML config into the command's defaults, so explicit flags still win."""
    from lorakit.options import read_yaml

    if value is None:
        return None
    try:
        data = read_yaml(value)
    except ValueError as err:
        raise typer.BadParameter(str(err), ctx, param) from None
    known = {p.name for p in ctx.command.params if p.name not in ("config",)}
    unknown = [key for key in data if key not in known]
    if unknown:
        options = ", ".join(sorted(k.replace("_", "-") for k in known))
        raise typer.BadParameter(f"{value}: unknown key {unknown[0]!r}; valid keys: {options}", ctx, param)
    ctx.default_map = {**(ctx.default_map or {}), **data}
    return value


ConfigOption = typer.Option(
    "--config", help="YAML file of options (same names); command-line flags override it.",
    callback=_load_config, is_eager=True,
)
"""Use as `config: Annotated[Optional[Path], ConfigOption] = None` in a command's signature."""

TRUST_REMOTE_CODE_HELP = "Allow a model that ships its own Python code (auto_map) to run it; only for sources you trust."
TrustRemoteCodeOption = typer.Option(help=TRUST_REMOTE_CODE_HELP)
"""Use as `trust_remote_code: Annotated[bool, TrustRemoteCodeOption] = False` where a command loads a model."""
