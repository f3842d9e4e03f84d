"""Options of `lorakit grpo`: the shared training options (train/config.py) plus sampling, rewards and the
GRPO loss. Checked when the config is built, before any data is read or model loaded; the reward file is
checked here too, its function when the rewards are built (still before the model loads)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lorakit.options import OptionError, finite, flag, one_of, option, positive_ints
from lorakit.train.config import TuningConfig, changed_lora_options
from lorakit.train.grpo_loss import LOSS_TYPES
from lorakit.train.rewards import BUILTINS

SAMPLING = "Sampling"
REWARDS = "Rewards"
LOSS = "GRPO loss"


@dataclass
class GRPOConfig(TuningConfig):
    """Every option of `lorakit grpo`: `batch_size` counts prompts (each gives `num_generations`
    completions), `max_seq_len` bounds prompt + completion."""

    data: str | None = option(
        None,
        help='Prompts: rows with "prompt" (a string or messages) or chat "messages", '
        "plus any columns the rewards use (JSONL/JSON/Parquet/CSV) (default: "
        "the bundled date task).",
    )
    validation_data: str | None = option(
        None,
        help="Validation prompts, scored by greedy answers' mean reward "
        "(default: the bundled validation split when --data is not "
        "given).",
    )
    test_data: str | None = option(None, help="Test prompts scored after training, base and best adapter "
                                              "(default: the bundled test split when --data is not given).")
    output: str = option("runs/lorakit-grpo", help="Run directory: adapter/, checkpoint/, metrics.jsonl, "
                                                   "loss_curve.png, report.json.")
    learning_rate: float = option(1e-4, help="Peak learning rate (AdamW).")
    batch_size: int = option(4, help="Prompts per micro-batch (per process); each gives --num-generations "
                                     "completions.")
    eval_every: int = option(25, help="Validation (mean reward of greedy answers) every N steps; the best "
                                      "adapter is kept.")
    eval_limit: int | None = option(None, help="Score at most N test prompts after training.")
    adapter: str | None = option(
        None,
        help="Continue training this adapter; its frozen copy is the reference. "
        "It brings its own LoRA settings.",
        panel=LOSS,
    )
    num_generations: int = option(8, help="G: completions sampled per prompt (a group; at least 2).",
                                  panel=SAMPLING)
    max_completion_length: int = option(32, help="Tokens generated per completion at most.", panel=SAMPLING)
    temperature: float = option(1.0, help="Sampling temperature (> 0).", panel=SAMPLING)
    top_p: float = option(1.0, help="Nucleus sampling: keep the most likely tokens up to this mass.",
                          panel=SAMPLING)
    stop: list[str] = option(default_factory=list, help="Stop strings: a completion ends before the first "
                                                        "(repeatable).", panel=SAMPLING, commas=False)
    reward: list[str] = option(default_factory=lambda: ["exact_match"], panel=REWARDS,
                               help=f"Reward functions: {', '.join(BUILTINS)} or path/to/file.py:function "
                                    "(repeatable; summed with --reward-weights).")
    reward_weights: list[float] = option(default_factory=list, panel=REWARDS,
                                         help="One weight per --reward (default: all 1).")
    answer_column: str = option("answer", help="The column exact_match compares with (chat rows: their last "
                                               "assistant turn).", panel=REWARDS)
    reward_regex: str | None = option(
        None, help="The pattern of the regex reward (re.search).", panel=REWARDS
    )
    length_target: int = option(64, help="Characters the length reward allows before penalising.",
                                panel=REWARDS)
    loss_type: str = option("grpo", help="grpo (DeepSeekMath), dr_grpo (no std scaling, constant "
                                         "normaliser) or dapo (token-level).", panel=LOSS)
    beta: float = option(0.0, help="β: weight of the KL penalty to the reference (the adapter switched off).",
                         panel=LOSS)
    epsilon: float = option(0.2, help="ε: the policy ratio is clipped to [1 − ε, 1 + ε-high].", panel=LOSS)
    epsilon_high: float | None = option(None, help="Upper clip ε (DAPO's clip-higher; default: --epsilon).",
                                        panel=LOSS)
    num_iterations: int = option(1, help="μ: optimizer steps on each batch of sampled completions.",
                                 panel=LOSS)

    def validate(self) -> None:
        super().validate()
        positive_ints(self, ("max_completion_length", "num_iterations", "length_target"), ("eval_limit",))
        if self.num_generations < 2:
            raise OptionError(
                "num_generations",
                "at least 2 (advantages compare the completions of a prompt)",
                self.num_generations,
            )
        if self.max_completion_length >= self.max_seq_len:
            raise ValueError(
                f"--max-completion-length: expected less than --max-seq-len ({self.max_seq_len}) to "
                f"leave room for the prompt, got {self.max_completion_length}"
            )
        if not finite(self.temperature) or self.temperature <= 0:
            raise OptionError("temperature", "a positive number (a group of greedy answers has no variance)",
                              self.temperature)
        if not finite(self.top_p) or not 0 < self.top_p <= 1:
            raise OptionError("top_p", "a number in (0, 1]", self.top_p)
        for name in ("beta", "epsilon", "epsilon_high"):
            value = getattr(self, name)
            if value is not None and (not finite(value) or value < 0):
                raise OptionError(name, "a non-negative number", value)
        one_of(self, "loss_type", LOSS_TYPES)
        if any(not s for s in self.stop):
            raise OptionError("stop", "non-empty strings", self.stop)
        self._validate_rewards()
        if self.fsdp:
            raise ValueError("--fsdp: not supported by grpo (sampling runs the whole model on each process)")
        if self.adapter is not None and changed_lora_options(self.lora):
            changed = ", ".join(flag(n) for n in changed_lora_options(self.lora))
            raise ValueError(
                f"--adapter {self.adapter} brings its own LoRA settings (its adapter_config.json); "
                f"{changed} cannot be set with it"
            )

    def _validate_rewards(self) -> None:
        if not self.reward:
            raise OptionError("reward", "at least one reward function", self.reward)
        if self.reward_weights and len(self.reward_weights) != len(self.reward):
            raise ValueError(f"--reward-weights: expected {len(self.reward)} weights (one per --reward), got "
                             f"{len(self.reward_weights)}")
        for spec in self.reward:
            if spec in BUILTINS:
                continue
            path, _, name = spec.rpartition(":")
            if not path.endswith(".py") or not name.isidentifier():
                raise OptionError("reward", f"{', '.join(BUILTINS)} or path/to/file.py:function", spec)
            if not Path(path).is_file():
                raise ValueError(f"--reward {spec}: reward file {path} does not exist")
        if "regex" in self.reward:
            if self.reward_regex is None:
                raise ValueError("--reward regex: needs --reward-regex PATTERN")
            try:
                re.compile(self.reward_regex)
            except re.error as err:
                raise OptionError(
                    "reward_regex", f"a regular expression ({err})", self.reward_regex
                ) from None

    @property
    def epsilon_upper(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high
