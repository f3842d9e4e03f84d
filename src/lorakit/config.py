"""`LoraConfig`: the adapter's hyper-parameters, with PEFT's field names, defaults and JSON file.

A config written here is a valid PEFT `adapter_config.json` and a PEFT config reads back here.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lorakit.errors import AdapterFileError, ConfigKindError
from lorakit.options import OptionError, option

CONFIG_NAME = "adapter_config.json"

BIAS_MODES = ("none", "all", "lora_only")
_NAMED_INITS = ("gaussian", "olora", "pissa")
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")

# Keys that PEFT writes for features lorakit does not implement. Their default (empty) values are
# skipped silently; anything else is refused, because silently dropping them would change the adapter.
_PEFT_ONLY_KEYS = {
    "alora_invocation_tokens", "arrow_config", "corda_config", "eva_config", "kasa_config",
    "layer_replication", "loftq_config", "lora_ga_config", "megatron_config", "monteclora_config",
    "target_parameters", "trainable_token_indices", "use_bdlora", "use_qalora", "velora_config",
}
# PEFT bookkeeping that carries no meaning for the adapter's maths.
_PEFT_INFO_KEYS = {
    "auto_mapping", "peft_version", "revision", "megatron_core", "qalora_group_size",
    "ensure_weight_tying",
}


class PeftType(str, enum.Enum):
    """PEFT's adapter-method names; lorakit implements LORA. A str, so it equals "LORA" and writes as it."""

    LORA = "LORA"


class TaskType(str, enum.Enum):
    """PEFT's task names; only recorded in the config (the model's own head decides the task)."""

    CAUSAL_LM = "CAUSAL_LM"
    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


@dataclass
class LoraConfig:
    """Hyper-parameters of one LoRA adapter (Hu et al. 2021, arXiv:2106.09685).

    The update of a targeted weight W (out × in) is ΔW = s · B · A with A (r × in), B (out × r) and the
    scaling s = lora_alpha / r, or lora_alpha / √r with rsLoRA (Kalajdzievski 2023, arXiv:2312.03732).

    target_modules: a list matches a module whose name equals an entry or ends with ".entry"; a string
    is a regular expression that must match the whole module name; "all-linear" takes every Linear /
    Conv1D except the output head; None uses the architecture's default (e.g. q_proj, v_proj for Llama).
    """

    r: int = option(8, help="LoRA rank.")
    target_modules: list[str] | str | None = option(
        None, help="Modules to adapt: names (comma-separated or repeated), a regex, or all-linear.")
    exclude_modules: list[str] | str | None = option(None, help="Modules never to adapt (names or a regex).")
    lora_alpha: float = option(8, help="LoRA alpha; scaling = alpha / r (alpha / sqrt(r) with --use-rslora).")
    lora_dropout: float = option(0.0, help="Dropout on the LoRA input.")
    fan_in_fan_out: bool = False
    bias: str = option("none", help="Train base biases too: none, all or lora_only.")
    use_rslora: bool = option(False, help="Rank-stabilised scaling alpha / sqrt(r).")
    modules_to_save: list[str] | None = option(
        None, help="Modules trained and saved whole beside the adapter (e.g. lm_head).")
    init_lora_weights: bool | str = option(
        True, help="Adapter initialisation: true (default), false, gaussian, olora, pissa or pissa_niter_N.")
    layers_to_transform: list[int] | int | None = option(None, help="Adapt only these layer indices.")
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = option(
        default_factory=dict, help="Rank per module-name pattern, e.g. q_proj=16,v_proj=8.")
    alpha_pattern: dict[str, float] = option(default_factory=dict, help="Alpha per module-name pattern.")
    use_dora: bool = option(False, help="DoRA: weight-decomposed LoRA.")
    lora_bias: bool = option(False, help="Train a bias in lora_B.")
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    inference_mode: bool = False
    peft_type: PeftType | str = PeftType.LORA

    # PEFT's config kind flags, read by code written for PEFT: LoRA is neither prompt learning nor an
    # adaption prompt; and it targets modules, never bare parameters (PEFT's target_parameters).
    is_prompt_learning = False
    is_adaption_prompt = False
    target_parameters = None

    def __post_init__(self) -> None:
        if self.peft_type == PeftType.LORA:
            self.peft_type = PeftType.LORA
        # PEFT compares these init names case-insensitively ("OLoRA", "Gaussian"); "pissa..." it does not.
        init = self.init_lora_weights
        if isinstance(init, str) and init.lower() in ("gaussian", "olora"):
            self.init_lora_weights = init.lower()
        if isinstance(self.task_type, TaskType):
            self.task_type = self.task_type.value
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = list(self.modules_to_save)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field whose value cannot work."""

        def bad(name: str, expected: str) -> OptionError:
            return OptionError(name, expected, getattr(self, name), owner="LoraConfig")

        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise bad("r", "a positive integer")
        if (
            isinstance(self.lora_alpha, bool)
            or not isinstance(self.lora_alpha, (int, float))
            or not math.isfinite(self.lora_alpha)
        ):
            raise bad("lora_alpha", "a finite number")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise bad("lora_dropout", "a probability in [0, 1)")
        if self.bias not in BIAS_MODES:
            raise bad("bias", f"one of {', '.join(BIAS_MODES)}")
        if self.peft_type != "LORA":
            raise bad("peft_type", '"LORA" (lorakit implements LoRA only)')
        init = self.init_lora_weights
        if not isinstance(init, bool) and not (
            init in _NAMED_INITS or (isinstance(init, str) and _PISSA_NITER.fullmatch(init))
        ):
            raise bad("init_lora_weights", 'True, False, "gaussian", "olora", "pissa" or "pissa_niter_N"')
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
                    raise bad(name, "a list of module names, a regex string, or None")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise bad("target_modules", "at least one module name")
        if self.modules_to_save is not None and not (
            isinstance(self.modules_to_save, list) and all(isinstance(m, str) for m in self.modules_to_save)
        ):
            raise bad("modules_to_save", "a list of module names or None")
        # A regex names whole modules itself; PEFT refuses a layer selection on top of it.
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str.")
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise bad("layers_pattern", "to be used together with layers_to_transform")
        layers = self.layers_to_transform
        if layers is not None:
            values = [layers] if isinstance(layers, int) else layers
            if not isinstance(values, list) or not all(isinstance(i, int) and i >= 0 for i in values):
                raise bad("layers_to_transform", "a non-negative layer index or a list of them")
        self._check_patterns()
        if self.use_dora and self.lora_bias:
            raise OptionError(
                "lora_bias", "false with use_dora (not supported together)", True, owner="LoraConfig"
            )

    def _check_patterns(self) -> None:
        """rank_pattern: positive integers; alpha_pattern: numbers; both keyed by module-name pattern."""
        for name in ("rank_pattern", "alpha_pattern"):
            pattern = getattr(self, name)
            if not isinstance(pattern, dict):
                raise OptionError(name, "a mapping of module-name pattern to value", pattern,
                                  owner="LoraConfig")
            for key, value in pattern.items():
                positive = (
                    isinstance(value, int) and value > 0
                    if name == "rank_pattern"
                    else isinstance(value, (int, float))
                )
                if isinstance(value, bool) or not positive:
                    kind = "integer" if name == "rank_pattern" else "number"
                    raise OptionError(f"{name}[{key!r}]", f"a positive {kind}", value, owner="LoraConfig")

    # ---- rank and scaling per module -------------------------------------------------------------

    def rank_for(self, module_name: str) -> int:
        """r for one module: the first `rank_pattern` key matching the name's end, else `r`."""
        key = pattern_key(self.rank_pattern, module_name)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        key = pattern_key(self.alpha_pattern, module_name)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    def scaling(self, r: int, alpha: float) -> float:
        """s = alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    # ---- JSON file -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if isinstance(data["target_modules"], list):
            data["target_modules"] = sorted(set(data["target_modules"]))
        return data

    def save_pretrained(self, save_directory: str | Path) -> None:
        """Write `adapter_config.json` (atomically) into `save_directory`."""
        from lorakit.io.atomic import atomic_write_text

        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path / CONFIG_NAME, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> LoraConfig:
        """Build from a PEFT-style dict; PEFT-only keys left at their defaults are skipped."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        unknown = [key for key in data if key not in known and key not in _PEFT_ONLY_KEYS | _PEFT_INFO_KEYS]
        if unknown and "peft_type" not in data:
            # As PEFT: a file with keys no config has, and no peft_type, is not taken for a LoRA config.
            raise ConfigKindError(f"{source}: the LoraConfig config that is trying to be loaded is missing "
                                  f"required keys: {{'peft_type'}} (and has unknown keys {sorted(unknown)})")
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key in _PEFT_ONLY_KEYS:
                if value not in (None, False, {}, [], ""):
                    raise ValueError(
                        f"{source}: key {key!r} uses a PEFT feature lorakit does not support (value "
                        f"{value!r})"
                    )
        if unknown:
            warnings.warn(f"Unexpected keyword arguments {sorted(unknown)} for class LoraConfig, these are "
                          f"ignored. ({source})", UserWarning, stacklevel=2)
        try:
            return cls(**kwargs)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None

    @classmethod
    def from_pretrained(cls, path: str | Path, subfolder: str | None = None) -> LoraConfig:
        """Read `adapter_config.json` from a directory (or the file itself)."""
        path = Path(path)
        if subfolder:
            path = path / subfolder
        file = path if path.is_file() else path / CONFIG_NAME
        if not file.is_file():
            raise AdapterFileError(
                f"{file}: adapter config not found (expected a directory holding {CONFIG_NAME})"
            )
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise AdapterFileError(f"{file}: not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise AdapterFileError(f"{file}: expected a JSON object")
        return cls.from_dict(data, source=str(file))


def pattern_key(patterns: dict[str, Any], module_name: str) -> str | None:
    """The first key of `patterns` that matches the end of `module_name` at a dot boundary.

    Keys are regular expressions (as in PEFT's rank_pattern): "q_proj" matches every
    "...q_proj", "layers.0.self_attn.q_proj" only that module.
    """
    for key in patterns:
        if re.fullmatch(rf"(.*\.)?(?:{key})", module_name):
            return key
    return None
