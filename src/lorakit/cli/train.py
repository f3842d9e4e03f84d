"""`lorakit train`: supervised fine-tuning with LoRA (or full fine-tuning); options from TrainConfig."""

from __future__ import annotations

from lorakit.cli.app import app
from lorakit.cli.options import config_command
from lorakit.train.config import TrainConfig


def _train(config: TrainConfig) -> None:
    """Fine-tune a model with LoRA on chat, prompt/completion or text data.

    With no options: the embedded SmolLM2-135M-Instruct learns the bundled date-normalisation task.
    """
    from lorakit.train.sft import train

    train(config)


app.command("train")(config_command(TrainConfig, _train))
