"""The `lorakit` command: a Typer app (help generated from type hints) with YAML config files.

Every command takes `--config FILE.yaml`; its keys are the command's options (dash or underscore form)
and flags given on the command line override them (Click's `default_map`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
import yaml

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
    if value is None:
        return None
    try:
        data = yaml.safe_load(Path(value).read_text(encoding="utf-8")) or {}
    except OSError as err:
        raise typer.BadParameter(f"{value}: cannot read ({err.strerror})", ctx, param) from None
    except yaml.YAMLError as err:
        raise typer.BadParameter(f"{value}: not valid YAML ({err})", ctx, param) from None
    if not isinstance(data, dict):
        raise typer.BadParameter(f"{value}: expected a mapping of option names to values", ctx, param)
    known = {p.name for p in ctx.command.params if p.name not in ("config",)}
    defaults: dict[str, Any] = {}
    for key, item in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            options = ", ".join(sorted(k.replace("_", "-") for k in known))
            raise typer.BadParameter(f"{value}: unknown key {key!r}; valid keys: {options}", ctx, param)
        defaults[name] = item
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


ConfigOption = typer.Option(
    "--config", help="YAML file of options (same names); command-line flags override it.",
    callback=_load_config, is_eager=True,
)
"""Use as `config: Annotated[Optional[Path], ConfigOption] = None` in a command's signature."""

TRUST_REMOTE_CODE_HELP = "Allow a model that ships its own Python code (auto_map) to run it; only for sources you trust."
TrustRemoteCodeOption = typer.Option(help=TRUST_REMOTE_CODE_HELP)
"""Use as `trust_remote_code: Annotated[bool, TrustRemoteCodeOption] = False` where a command loads a model."""
