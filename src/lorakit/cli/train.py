"""`lorakit train`: supervised fine-tuning with LoRA (or full fine-tuning) — options from TrainConfig."""

from __future__ import annotations

from typing import Any

from lorakit.cli.app import TRUST_REMOTE_CODE_HELP, app
from lorakit.cli.options import dataclass_parameters, split_commas, with_signature
from lorakit.train.config import TrainConfig

HELP = {
    "model": "Base model: a local transformers dir, a .gguf file or a hub id (default: embedded SmolLM2-135M-Instruct).",
    "data": "Training data (JSONL/JSON/Parquet/CSV; messages, prompt/completion or text) (default: bundled dates demo).",
    "validation_data": "Validation file (default: bundled demo validation when --data is not given).",
    "validation_fraction": "Hold out this fraction of --data for validation (seeded) when no --validation-data.",
    "test_data": "Test file with reference answers for the exact-match report (default: bundled demo test).",
    "output": "Run directory: adapter/, checkpoint/, metrics.jsonl, loss_curve.png, report.json.",
    "method": "lora, or full (full fine-tuning baseline).",
    "r": "LoRA rank.",
    "lora_alpha": "LoRA alpha; scaling = alpha / r (alpha / sqrt(r) with --use-rslora).",
    "lora_dropout": "Dropout on the LoRA input.",
    "target_modules": "Modules to adapt: names (comma-separated or repeated) or all-linear.",
    "init": "Adapter initialisation: default, gaussian, olora, pissa or pissa_niter_N.",
    "use_rslora": "Rank-stabilised scaling alpha / sqrt(r).",
    "use_dora": "DoRA: weight-decomposed LoRA.",
    "learning_rate": "Peak learning rate (AdamW).",
    "epochs": "Passes over the training data (fractions allowed).",
    "max_steps": "Stop after this many optimizer steps (overrides --epochs).",
    "batch_size": "Rows per micro-batch (per process).",
    "grad_accum": "Micro-batches per optimizer step.",
    "max_seq_len": "Truncate rows to this many tokens (truncations are counted and reported).",
    "warmup_steps": "Linear warm-up steps.",
    "lr_scheduler": "cosine, linear or constant (after warm-up).",
    "max_grad_norm": "Clip the gradient norm (0 disables).",
    "weight_decay": "AdamW weight decay (not applied to biases and vectors).",
    "eval_every": "Validation loss every N steps; the best adapter is kept.",
    "save_every": "Checkpoint every N steps (default: --eval-every).",
    "early_stopping_patience": "Stop after N evaluations without validation improvement.",
    "seed": "Seed for data order, initialisation and dropout.",
    "packing": "Pack rows into full-length blocks.",
    "train_on_prompt": "Train on every token, not only the assistant's answer.",
    "gradient_checkpointing": "Recompute activations in backward to save memory.",
    "compile": "torch.compile the decoder layers for training (a one-off compile, then faster steps).",
    "load_in_8bit": "Load the base in 8-bit (bitsandbytes).",
    "load_in_4bit": "Load the base in 4-bit NF4 (bitsandbytes, QLoRA).",
    "eval_max_new_tokens": "Tokens generated per test row for exact match.",
    "eval_limit": "Score at most N test rows.",
    "resume": "Continue the run in --output from its last checkpoint.",
    "trust_remote_code": TRUST_REMOTE_CODE_HELP,
    "overwrite": "Replace an existing run in --output.",
}


def train_command(**options: Any) -> None:
    """Fine-tune a model with LoRA on chat, prompt/completion or text data.

    With no options: the embedded SmolLM2-135M-Instruct learns the bundled date-normalisation task.
    """
    from lorakit.train.sft import train

    options.pop("config", None)
    options["target_modules"] = split_commas(options["target_modules"])
    train(TrainConfig(**options))


app.command("train")(with_signature(train_command, dataclass_parameters(TrainConfig, HELP)))
