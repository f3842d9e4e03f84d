"""`lorakit dpo`: preference tuning (DPO, IPO) with LoRA — options from DPOConfig."""

from __future__ import annotations

from typing import Any

from lorakit.cli.app import app
from lorakit.cli.options import dataclass_parameters, split_commas, with_signature
from lorakit.cli.train import HELP as TRAIN_HELP
from lorakit.train.dpo import DPOConfig

PANEL = "Preference tuning"

HELP = {
    **TRAIN_HELP,
    "data": 'Preference pairs: rows with "prompt", "chosen", "rejected" (strings or message lists; '
            "JSONL/JSON/Parquet/CSV) (default: bundled date-format preferences).",
    "validation_data": "Validation pairs (default: bundled validation pairs when --data is not given).",
    "output": "Run directory: adapter/, checkpoint/, metrics.jsonl, loss_curve.png, report.json.",
    "r": "LoRA rank (ignored with --adapter, which brings its own config; as are the other LoRA options).",
    "batch_size": "Preference pairs per micro-batch (per process); each pair is two sequences.",
    "max_seq_len": "Tokens per side (prompt + answer); longer answers are cut and counted, a prompt that leaves "
                   "no room is an error.",
    "eval_every": "Validation loss and reward accuracy every N steps; the best adapter is kept.",
    "adapter": "Continue training this adapter (e.g. from lorakit train); its frozen copy is the reference.",
    "beta": "β: strength of the pull towards the reference (DPO's KL weight; IPO's τ).",
    "loss_type": "sigmoid (DPO, Rafailov et al. 2023) or ipo (Azar et al. 2023).",
    "label_smoothing": "Assumed probability that a preference label is flipped (conservative DPO; sigmoid only).",
    "precompute_ref": "Compute the reference log-probs once before training (one forward per pair per step).",
    "max_prompt_len": "Refuse prompts longer than this many tokens (default: anything that leaves room for an answer).",
}

DPO_FIELDS = ("adapter", "beta", "loss_type", "label_smoothing", "precompute_ref", "max_prompt_len")


def dpo_command(**options: Any) -> None:
    """Preference-tune a model with LoRA on (prompt, chosen, rejected) pairs: DPO or IPO.

    The reference needs no copy of the model: it is the model with the adapter off (with --adapter: its frozen copy).

    With no options: the embedded SmolLM2-135M-Instruct learns to prefer ISO dates on bundled date-format pairs.
    """
    from lorakit.train.dpo import train_dpo

    options.pop("config", None)
    options["target_modules"] = split_commas(options["target_modules"])
    train_dpo(DPOConfig(**options))


app.command("dpo")(with_signature(dpo_command, dataclass_parameters(DPOConfig, HELP, {name: PANEL for name in DPO_FIELDS})))
