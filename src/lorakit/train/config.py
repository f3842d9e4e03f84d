"""`TrainConfig`: every option of `lorakit train`, its defaults, and its validation.

The defaults are a complete, sensible run: the embedded SmolLM2-135M-Instruct, the bundled date
normalisation dataset, LoRA r=8 on all linear layers. CLI flags use the dash form of these names
(`--lora-alpha`), and a YAML `--config` file takes the same keys.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METHODS = ("lora", "full")
SCHEDULERS = ("cosine", "linear", "constant")
INITS = ("default", "gaussian", "olora", "pissa")


@dataclass
class TrainConfig:
    model: str | None = None
    data: str | None = None
    validation_data: str | None = None
    validation_fraction: float = 0.0
    test_data: str | None = None
    output: str = "runs/lorakit"
    method: str = "lora"
    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    init: str = "default"
    use_rslora: bool = False
    use_dora: bool = False
    learning_rate: float = 1e-3
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    max_seq_len: int = 256
    warmup_steps: int = 10
    lr_scheduler: str = "cosine"
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    eval_every: int = 50
    save_every: int | None = None
    early_stopping_patience: int | None = None
    seed: int = 0
    packing: bool = False
    train_on_prompt: bool = False
    gradient_checkpointing: bool = False
    load_in_8bit: bool = False
    load_in_4bit: bool = False
    eval_max_new_tokens: int = 24
    eval_limit: int | None = None
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = [t.strip() for t in self.target_modules.split(",") if t.strip()]
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the option (in its CLI form) and what it accepts."""

        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"--{name.replace('_', '-')}: expected {expected}, got {getattr(self, name)!r}")

        positive_ints = ("r", "batch_size", "grad_accum", "max_seq_len", "eval_every", "eval_max_new_tokens")
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise bad(name, "a positive integer")
        for name in ("max_steps", "save_every", "early_stopping_patience", "eval_limit"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise bad(name, "a positive integer")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise bad("warmup_steps", "a non-negative integer")
        if not _finite(self.learning_rate) or self.learning_rate <= 0:
            raise bad("learning_rate", "a positive number")
        if not _finite(self.epochs) or self.epochs <= 0:
            raise bad("epochs", "a positive number")
        if not _finite(self.lora_alpha) or self.lora_alpha <= 0:
            raise bad("lora_alpha", "a positive number")
        if not _finite(self.lora_dropout) or not 0 <= self.lora_dropout < 1:
            raise bad("lora_dropout", "a probability in [0, 1)")
        if not _finite(self.validation_fraction) or not 0 <= self.validation_fraction < 1:
            raise bad("validation_fraction", "a fraction in [0, 1)")
        if not _finite(self.max_grad_norm) or self.max_grad_norm < 0:
            raise bad("max_grad_norm", "a non-negative number (0 disables clipping)")
        if not _finite(self.weight_decay) or self.weight_decay < 0:
            raise bad("weight_decay", "a non-negative number")
        if self.method not in METHODS:
            raise bad("method", " or ".join(METHODS))
        if self.lr_scheduler not in SCHEDULERS:
            raise bad("lr_scheduler", ", ".join(SCHEDULERS))
        if self.init not in INITS and not self.init.startswith("pissa_niter_"):
            raise bad("init", ", ".join(INITS) + " or pissa_niter_N")
        if not self.target_modules:
            raise bad("target_modules", "at least one module name (or all-linear)")
        if self.load_in_8bit and self.load_in_4bit:
            raise ValueError("--load-in-8bit and --load-in-4bit: choose one")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite: choose one (resume continues the run in --output)")

    @property
    def init_lora_weights(self) -> bool | str:
        """The LoraConfig value for --init."""
        return True if self.init == "default" else self.init

    @property
    def output_dir(self) -> Path:
        return Path(self.output)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in data.items():
            name = str(key).replace("-", "_")
            if name not in names:
                raise ValueError(f"{source}: unknown key {key!r}")
            kwargs[name] = value
        return cls(**kwargs)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
