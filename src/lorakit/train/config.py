"""Options of the trainers: their names, types, defaults, help and validation, in one place.

`TuningConfig` holds what every lorakit trainer takes (model, data, optimisation, checkpoints) and the
adapter as a whole `LoraConfig` (`lora`), passed as is to `get_peft_model`; `TrainConfig` adds the options
of `lorakit train` (SFT), `DPOConfig` those of `lorakit dpo`. The defaults are a complete, sensible run: the
embedded SmolLM2-135M-Instruct, the bundled date-normalisation data, LoRA r=8 on all linear layers.

Flat option names are the one spelling everywhere: command-line flags (`--lora-alpha`), YAML keys
(`lora_alpha:`) and `from_options({"lora_alpha": 32})`. The LoRA options among them are LoraConfig's own
fields (`LORA_OPTIONS`), with LoraConfig's types and checks; unset ones take `default_lora()`'s values.
Every value is checked against its field's type and range when the config is built, before any model loads.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from lorakit.config import LoraConfig
from lorakit.device import DEVICE_HELP, DTYPE_HELP, DtypeName, valid_device_name
from lorakit.options import (
    TRUST_REMOTE_CODE_HELP,
    OptionError,
    Options,
    check_value,
    finite,
    flag,
    one_of,
    option,
    positive_ints,
)

METHODS = ("lora", "full")
SCHEDULERS = ("cosine", "linear", "constant")
DPO_LOSS_TYPES = ("sigmoid", "ipo")
TRACKERS = ("tensorboard", "mlflow", "wandb", "trackio", "aim", "comet_ml", "clearml", "dvclive", "swanlab")
"""What `--report-to` takes besides `none`: accelerate's tracker integrations, by accelerate's names."""

LORA_OPTIONS = (
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "exclude_modules",
    "init_lora_weights",
    "use_rslora",
    "use_dora",
    "bias",
    "lora_bias",
    "modules_to_save",
    "layers_to_transform",
    "rank_pattern",
    "alpha_pattern",
)
"""LoraConfig fields that trainers take as options (`--r`, `r:` in YAML); they build `TuningConfig.lora`."""

T = TypeVar("T", bound="TuningConfig")


def default_lora() -> LoraConfig:
    """The adapter a trainer adds when no LoRA option says otherwise: r=8, alpha 16, every linear layer."""
    return LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")


@dataclass
class TuningConfig(Options):
    """The options shared by every trainer; subclasses add their own fields and checks."""

    model: str | None = option(None, help="Base model: a local transformers dir, a .gguf file or a hub id "
                                          "(default: embedded SmolLM2-135M-Instruct).")
    data: str | None = option(
        None, help="Training data (JSONL/JSON/Parquet/CSV) (default: bundled demo data)."
    )
    validation_data: str | None = option(None, help="Validation file (default: the bundled validation split "
                                                    "when --data is not given).")
    validation_fraction: float = option(0.0, help="Hold out this fraction of --data for validation (seeded) "
                                                  "when no --validation-data.")
    output: str = option("runs/lorakit", help="Run directory: adapter/, checkpoint/, metrics.jsonl, "
                                              "loss_curve.png, report.json.")
    lora: LoraConfig = option(
        default_factory=default_lora, help="The adapter's LoRA settings (LORA_OPTIONS)."
    )
    learning_rate: float = option(1e-3, help="Peak learning rate (AdamW).")
    epochs: float = option(1.0, help="Passes over the training data (fractions allowed).")
    max_steps: int | None = option(None, help="Stop after this many optimizer steps (overrides --epochs).")
    batch_size: int = option(8, help="Rows per micro-batch (per process).")
    grad_accum: int = option(1, help="Micro-batches per optimizer step.")
    max_seq_len: int = option(256, help="Truncate rows to this many tokens (truncations are counted).")
    warmup_steps: int = option(10, help="Linear warm-up steps.")
    lr_scheduler: str = option("cosine", help="cosine, linear or constant (after warm-up).")
    max_grad_norm: float = option(1.0, help="Clip the gradient norm (0 disables).")
    weight_decay: float = option(0.0, help="AdamW weight decay (not applied to biases and vectors).")
    eval_every: int = option(50, help="Validation every N steps; the best adapter is kept.")
    save_every: int | None = option(None, help="Checkpoint every N steps (default: --eval-every).")
    early_stopping_patience: int | None = option(None, help="Stop after N evaluations without improvement.")
    seed: int = option(0, help="Seed for data order, initialisation and dropout.")
    device: str = option("auto", help=DEVICE_HELP + " Under a launch of several processes each takes its "
                                      "own GPU (auto) or all run on the CPU (cpu).")
    dtype: DtypeName = option("auto", help=DTYPE_HELP + " A bf16/fp16 base trains under autocast; fp16 "
                                           "scales the loss.")
    gradient_checkpointing: bool = option(False, help="Recompute activations in backward to save memory.")
    compile: bool = option(False, help="torch.compile the decoder layers for training (a one-off compile, "
                                       "then faster steps).")
    fsdp: bool = option(False, help="Shard the model, adapter and optimizer state over the processes of a "
                                    "torchrun/accelerate launch (FSDP2) instead of replicating them (DDP).")
    liger: bool = option(False, help="On CUDA, swap RMSNorm, RoPE and SwiGLU for liger-kernel's Triton "
                                     "kernels (lorakit's gpu extra; the answer-only loss stays lorakit's).")
    load_in_8bit: bool = option(False, help="Load the base in 8-bit (bitsandbytes).")
    load_in_4bit: bool = option(False, help="Load the base in 4-bit NF4 (bitsandbytes, QLoRA).")
    trust_remote_code: bool = option(False, help=TRUST_REMOTE_CODE_HELP)
    resume: bool = option(False, help="Continue the run in --output from its last checkpoint.")
    overwrite: bool = option(False, help="Replace an existing run in --output.")
    report_to: list[str] = option(default_factory=lambda: ["none"], panel="Experiment tracking",
                                  help=f"Trackers to send metrics to: {', '.join(TRACKERS)} (comma-separated "
                                       "or repeated), or none.")
    run_name: str | None = option(None, help="The run's name in the trackers (default: the name of the "
                                             "--output directory).", panel="Experiment tracking")
    project: str = option("lorakit", help="The trackers' project (W&B, trackio, ...) or experiment (MLflow) "
                                          "that the run belongs to.", panel="Experiment tracking")
    logging_dir: str | None = option(None, help="Where trackers write local files: TensorBoard events go to "
                                                "LOGGING_DIR/RUN_NAME (default: OUTPUT/logs).",
                                     panel="Experiment tracking")

    def validate(self) -> None:
        """Raise OptionError (a ValueError) naming the option in its command-line form."""
        positive_ints(self, ("batch_size", "grad_accum", "max_seq_len", "eval_every"),
                      ("max_steps", "save_every", "early_stopping_patience"))
        if self.warmup_steps < 0:
            raise OptionError("warmup_steps", "a non-negative integer", self.warmup_steps)
        for name in ("learning_rate", "epochs"):
            if not finite(getattr(self, name)) or getattr(self, name) <= 0:
                raise OptionError(name, "a positive number", getattr(self, name))
        for name, expected in (("max_grad_norm", "a non-negative number (0 disables clipping)"),
                               ("weight_decay", "a non-negative number")):
            if not finite(getattr(self, name)) or getattr(self, name) < 0:
                raise OptionError(name, expected, getattr(self, name))
        if not finite(self.validation_fraction) or not 0 <= self.validation_fraction < 1:
            raise OptionError("validation_fraction", "a fraction in [0, 1)", self.validation_fraction)
        one_of(self, "lr_scheduler", SCHEDULERS)
        if not valid_device_name(self.device):
            raise OptionError("device", "auto, cpu, cuda or cuda:N", self.device)
        if self.fsdp and self.dtype == "fp16":
            raise ValueError("--dtype fp16 with --fsdp: fp16 loss scaling of sharded gradients is not "
                             "supported; use --dtype bf16")
        if self.load_in_8bit and self.load_in_4bit:
            raise ValueError("--load-in-8bit and --load-in-4bit: choose one")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite: choose one (resume continues the run in --output)")
        if any(name not in (*TRACKERS, "none") for name in self.report_to):
            raise OptionError("report_to", f"none or a list of {', '.join(TRACKERS)}", self.report_to)
        if "none" in self.report_to and len(self.report_to) > 1:
            raise ValueError(f"--report-to: none cannot be combined with trackers, got {self.report_to}")
        for name in ("run_name", "project"):
            if getattr(self, name) is not None and not getattr(self, name).strip():
                raise OptionError(name, "a non-empty name", getattr(self, name))

    @property
    def output_dir(self) -> Path:
        return Path(self.output)

    # ---- flat options: the command line, YAML files and dicts ----------------------------------------

    @classmethod
    def option_names(cls) -> list[str]:
        """Every flat option name, in declaration order, the LoRA ones in place of `lora`."""
        names = []
        for field in dataclasses.fields(cls):
            names.extend(LORA_OPTIONS if field.name == "lora" else [field.name])
        return names

    @classmethod
    def from_values(cls: type[T], values: dict[str, Any]) -> T:
        """Build from option values keyed by option name, the LoRA ones gathered into `lora`."""
        own = {name: value for name, value in values.items() if name not in LORA_OPTIONS}
        lora = {name: value for name, value in values.items() if name in LORA_OPTIONS}
        return cls(**own, lora=lora_from_options(lora))

    def to_options(self) -> dict[str, Any]:
        """The flat options that `from_options` reads back into an equal config (saved with each run)."""
        options: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            if field.name == "lora":
                options.update({name: getattr(self.lora, name) for name in LORA_OPTIONS})
            else:
                options[field.name] = getattr(self, field.name)
        return options


def lora_from_options(options: Mapping[str, Any]) -> LoraConfig:
    """`default_lora()` with the given LoRA options set, typed and checked as LoraConfig checks them;
    errors name the option in its command-line form."""
    hints = typing.get_type_hints(LoraConfig)
    values = {name: check_value(name, value, hints[name]) for name, value in options.items()}
    for name in ("target_modules", "exclude_modules"):
        # Flat options name modules, comma-separated, as the flags do (a regex needs a LoraConfig).
        if isinstance(values.get(name), str) and values[name] != "all-linear":
            values[name] = [part.strip() for part in values[name].split(",") if part.strip()]
    if values.get("target_modules") == ["all-linear"]:
        values["target_modules"] = "all-linear"
    init = values.get("init_lora_weights")
    if isinstance(init, str) and init.lower() in ("true", "false", "default"):
        values["init_lora_weights"] = init.lower() != "false"
    try:
        return dataclasses.replace(default_lora(), **values)
    except OptionError as err:
        raise OptionError(err.name, err.expected, err.value) from None


@dataclass
class TrainConfig(TuningConfig):
    """Every option of `lorakit train`: the shared ones plus supervised fine-tuning's own."""

    data: str | None = option(
        None,
        help="Training data (JSONL/JSON/Parquet/CSV; chat messages, prompt/completion "
        "or text) (default: bundled dates demo).",
    )
    test_data: str | None = option(None, help="Test file with reference answers for the exact-match report "
                                              "(default: bundled demo test split).")
    method: str = option("lora", help="lora, or full (full fine-tuning baseline).")
    packing: bool = option(False, help="Pack rows into full-length blocks.")
    train_on_prompt: bool = option(False, help="Train on every token, not only the assistant's answer.")
    eval_max_new_tokens: int = option(24, help="Tokens generated per test row for exact match.")
    eval_limit: int | None = option(None, help="Score at most N test rows.")

    def validate(self) -> None:
        super().validate()
        positive_ints(self, ("eval_max_new_tokens",), ("eval_limit",))
        one_of(self, "method", METHODS)


@dataclass
class DPOConfig(TuningConfig):
    """Every option of `lorakit dpo`: the shared training options (`batch_size` counts pairs, `max_seq_len`
    bounds each side) plus preference tuning's own."""

    data: str | None = option(
        None,
        help='Preference pairs: rows with "prompt", "chosen", "rejected" (strings or '
        "message lists; JSONL/JSON/Parquet/CSV) (default: bundled date-format "
        "preferences).",
    )
    validation_data: str | None = option(
        None, help="Validation pairs (default: bundled validation pairs when --data is not given)."
    )
    output: str = option("runs/lorakit-dpo", help="Run directory: adapter/, checkpoint/, metrics.jsonl, "
                                                  "loss_curve.png, report.json.")
    # Lower than SFT's: on the bundled pairs 5e-4 drove the margin up by pushing the chosen answers' log-probs
    # down too (DPO's likelihood displacement) and greedy answers degraded (benchmarks/README.md).
    learning_rate: float = option(1e-4, help="Peak learning rate (AdamW).")
    batch_size: int = option(
        8, help="Preference pairs per micro-batch (per process); each pair is two sequences."
    )
    max_seq_len: int = option(
        256,
        help="Tokens per side (prompt + answer); longer answers are cut and counted, a "
        "prompt that leaves no room is an error.",
    )
    eval_every: int = option(20, help="Validation loss and reward accuracy every N steps; the best adapter "
                                      "is kept.")
    adapter: str | None = option(None, help="Continue training this adapter (e.g. from lorakit train); its "
                                            "frozen copy is the reference. It brings its own LoRA settings.",
                                 panel="Preference tuning")
    beta: float = option(
        0.1,
        help="β: strength of the pull towards the reference (DPO's KL weight; IPO's τ).",
        panel="Preference tuning",
    )
    loss_type: str = option("sigmoid", help="sigmoid (DPO, Rafailov et al. 2023) or ipo (Azar et al. 2023).",
                            panel="Preference tuning")
    label_smoothing: float = option(0.0, help="Assumed probability that a preference label is flipped "
                                              "(conservative DPO; sigmoid only).", panel="Preference tuning")
    precompute_ref: bool = option(False, help="Compute the reference log-probs once before training (one "
                                              "forward per pair per step).", panel="Preference tuning")
    max_prompt_len: int | None = option(None, help="Refuse prompts longer than this many tokens (default: "
                                                   "anything that leaves room for an answer).",
                                        panel="Preference tuning")

    def validate(self) -> None:
        super().validate()
        positive_ints(self, (), ("max_prompt_len",))
        if not finite(self.beta) or self.beta <= 0:
            raise OptionError("beta", "a positive number", self.beta)
        one_of(self, "loss_type", DPO_LOSS_TYPES)
        if not finite(self.label_smoothing) or not 0 <= self.label_smoothing < 0.5:
            raise OptionError("label_smoothing", "a probability in [0, 0.5)", self.label_smoothing)
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError(f"--label-smoothing: only --loss-type sigmoid uses it, not {self.loss_type}")
        if self.max_prompt_len is not None and self.max_prompt_len >= self.max_seq_len:
            raise ValueError(
                f"--max-prompt-len: expected less than --max-seq-len ({self.max_seq_len}) to leave "
                f"room for the answers, got {self.max_prompt_len}"
            )
        if self.adapter is not None:
            changed = changed_lora_options(self.lora)
            if changed:
                raise ValueError(
                    f"--adapter {self.adapter} brings its own LoRA settings (its adapter_config.json); "
                    f"{', '.join(flag(n) for n in changed)} cannot be set with it"
                )


def changed_lora_options(lora: LoraConfig) -> list[str]:
    """The LORA_OPTIONS whose value differs from `default_lora()`'s."""
    default = default_lora()
    return [name for name in LORA_OPTIONS if getattr(lora, name) != getattr(default, name)]
