"""`lorakit dpo`: preference tuning (DPO, IPO) with LoRA; options from DPOConfig."""

from __future__ import annotations

from lorakit.cli.app import app
from lorakit.cli.options import config_command
from lorakit.train.config import DPOConfig


def _dpo(config: DPOConfig) -> None:
    """Preference-tune a model with LoRA on (prompt, chosen, rejected) pairs: DPO or IPO.

    The reference needs no copy of the model: it is the model with the adapter off (with --adapter: its
    frozen copy).

    With no options: the embedded SmolLM2-135M-Instruct learns to prefer ISO dates on bundled date-format
    pairs.
    """
    from lorakit.train.dpo import train_dpo

    train_dpo(config)


app.command("dpo")(config_command(DPOConfig, _dpo))
