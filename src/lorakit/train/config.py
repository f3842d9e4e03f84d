"""Options of the trainers, their defaults, and their validation.

`TuningConfig` holds what every lorakit trainer takes (model, data, LoRA, optimisation, checkpoints);
`TrainConfig` adds the options of `lorakit train` (SFT) and `lorakit.train.dpo.DPOConfig` those of
`lorakit dpo`. The defaults are a complete, sensible run: the embedded SmolLM2-135M-Instruct, the
bundled date normalisation dataset, LoRA r=8 on all linear layers. CLI flags use the dash form of these
names (`--lora-alpha`), and a YAML `--config` file takes the same keys.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

METHODS = ("lora", "full")
SCHEDULERS = ("cosine", "linear", "constant")
INITS = ("default", "gaussian", "olora", "pissa")

C = TypeVar("C", bound="TuningConfig")


@dataclass
class TuningConfig:
    """The options shared by every trainer; subclasses add their own fields and checks."""

    model: str | None = None
    data: str | None = None
    validation_data: str | None = None
    validation_fraction: float = 0.0
    output: str = "runs/lorakit"
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
    gradient_checkpointing: bool = False
    compile: bool = False
    load_in_8bit: bool = False
    load_in_4bit: bool = False
    trust_remote_code: bool = False
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = [t.strip() for t in self.target_modules.split(",") if t.strip()]
        self.validate()

    def bad(self, name: str, expected: str) -> ValueError:
        """The error for option `name`: its CLI form, what it accepts and what it got."""
        return ValueError(f"--{name.replace('_', '-')}: expected {expected}, got {getattr(self, name)!r}")

    def check_positive_ints(self, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
        """Raise for a field of `required` that is not a positive integer, or of `optional` that is neither
        that nor None."""
        for name in required + optional:
            value = getattr(self, name)
            if value is None and name in optional:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise self.bad(name, "a positive integer")

    def validate(self) -> None:
        """Raise ValueError naming the option (in its CLI form) and what it accepts."""
        bad = self.bad
        self.check_positive_ints(("r", "batch_size", "grad_accum", "max_seq_len", "eval_every"),
                                 ("max_steps", "save_every", "early_stopping_patience"))
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise bad("warmup_steps", "a non-negative integer")
        if not finite(self.learning_rate) or self.learning_rate <= 0:
            raise bad("learning_rate", "a positive number")
        if not finite(self.epochs) or self.epochs <= 0:
            raise bad("epochs", "a positive number")
        if not finite(self.lora_alpha) or self.lora_alpha <= 0:
            raise bad("lora_alpha", "a positive number")
        if not finite(self.lora_dropout) or not 0 <= self.lora_dropout < 1:
            raise bad("lora_dropout", "a probability in [0, 1)")
        if not finite(self.validation_fraction) or not 0 <= self.validation_fraction < 1:
            raise bad("validation_fraction", "a fraction in [0, 1)")
        if not finite(self.max_grad_norm) or self.max_grad_norm < 0:
            raise bad("max_grad_norm", "a non-negative number (0 disables clipping)")
        if not finite(self.weight_decay) or self.weight_decay < 0:
            raise bad("weight_decay", "a non-negative number")
        if self.lr_scheduler not in SCHEDULERS:
            raise bad("lr_scheduler", ", ".join(SCHEDULERS))
        if not isinstance(self.init, str) or (self.init not in INITS and not self.init.startswith("pissa_niter_")):
            raise bad("init", ", ".join(INITS) + " or pissa_niter_N")
        targets = self.target_modules
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
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
    def from_dict(cls: type[C], data: dict[str, Any], source: str = "config") -> C:
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in data.items():
            name = str(key).replace("-", "_")
            if name not in names:
                raise ValueError(f"{source}: unknown key {key!r}")
            kwargs[name] = value
        return cls(**kwargs)


@dataclass
class TrainConfig(TuningConfig):
    """Every option of `lorakit train`: the shared ones plus supervised fine-tuning's own."""

    test_data: str | None = None
    method: str = "lora"
    packing: bool = False
    train_on_prompt: bool = False
    eval_max_new_tokens: int = 24
    eval_limit: int | None = None

    def validate(self) -> None:
        super().validate()
        self.check_positive_ints(("eval_max_new_tokens",), ("eval_limit",))
        if self.method not in METHODS:
            raise self.bad("method", " or ".join(METHODS))


def finite(value: Any) -> bool:
    """A real number (not a bool, NaN or infinity)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
