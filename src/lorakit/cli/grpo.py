"""`lorakit grpo`: reinforcement learning from rewards a program checks (GRPO, Dr. GRPO, DAPO) with LoRA;
options from GRPOConfig."""

from __future__ import annotations

from lorakit.cli.app import app
from lorakit.cli.options import config_command
from lorakit.train.grpo_config import GRPOConfig


def _grpo(config: GRPOConfig) -> None:
    """Train a LoRA adapter with GRPO: sample G completions per prompt, score them with reward functions
    (exact_match, regex, length or your own file.py:function) and reinforce the better ones.

    The KL reference needs no copy of the model: it is the model with the adapter off (with --adapter: its
    frozen copy).

    With no options: the embedded SmolLM2-135M-Instruct learns the bundled date task from exact-match rewards.
    """
    from lorakit.train.grpo import train_grpo

    train_grpo(config)


app.command("grpo")(config_command(GRPOConfig, _grpo))
