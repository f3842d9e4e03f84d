"""Reward functions for `lorakit grpo`: built-ins, the user's own (`file.py:function`), and their weighted
sum.

A reward function takes `(prompts, completions, **columns)` — the prompts as the data gave them (strings
or message lists), the completions as text, and every other column of the data as a list aligned with
them — and returns one float per completion. Built-ins (`--reward NAME`):

    exact_match   1.0 when the completion equals the row's `--answer-column` (default "answer"; for chat
                  rows, their final assistant turn) after trimming whitespace and end-of-turn markers
    regex         1.0 when `--reward-regex` matches somewhere in the completion (`re.search`; anchor it
                  with ^...$ for a whole-completion format check), else 0.0
    length        a length penalty: −(characters beyond `--length-target`) / `--length-target`, at most
                  −1; 0.0 for completions within the target

A user function is `path/to/file.py:function`: the file is imported (it is the user's own code, named
on purpose) and the function called with the same arguments. The rewards used in the loss are
Σ_k w_k·r_k with `--reward-weights` (default all 1); each function's mean is logged on its own as
`reward_<name>`. Everything that can be checked before training is checked when the rewards are built
(the file, the function, the column); what a function returns is checked at every call, and a wrong
length or a non-number names the step and the function.
"""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError
from lorakit.train.scoring import normalise_answer

RewardFn = Callable[..., Sequence[float]]
BUILTINS = ("exact_match", "regex", "length")


@dataclass(frozen=True)
class Reward:
    """One reward function, its name in the logs and its weight."""

    name: str
    function: RewardFn
    weight: float = 1.0


def exact_match_reward(column: str) -> RewardFn:
    def exact_match(prompts: Sequence[Any], completions: Sequence[str], **columns: Any) -> list[float]:
        answers = columns[column]
        return [float(normalise_answer(c) == normalise_answer(str(a))) for c, a in zip(completions, answers)]
    return exact_match


def regex_reward(pattern: str) -> RewardFn:
    compiled = re.compile(pattern)

    def regex(prompts: Sequence[Any], completions: Sequence[str], **columns: Any) -> list[float]:
        return [float(compiled.search(c) is not None) for c in completions]
    return regex


def length_reward(target: int) -> RewardFn:
    def length(prompts: Sequence[Any], completions: Sequence[str], **columns: Any) -> list[float]:
        return [-min(1.0, max(0, len(c) - target) / target) for c in completions]
    return length


def load_user_function(spec: str) -> RewardFn:
    """The function named by `path/to/file.py:function`; one-line errors for a missing file or name."""
    path_text, _, name = spec.rpartition(":")
    path = Path(path_text)
    if not path_text.endswith(".py") or not name.isidentifier():
        raise LorakitError(f"--reward {spec}: expected {', '.join(BUILTINS)} or path/to/file.py:function")
    if not path.is_file():
        raise LorakitError(f"--reward {spec}: reward file {path} does not exist")
    module_name = f"lorakit_reward_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise LorakitError(f"--reward {spec}: cannot import {path}")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:
        raise LorakitError(f"--reward {spec}: importing {path} failed: {type(err).__name__}: {err}") from err
    function = getattr(module, name, None)
    if not callable(function):
        raise LorakitError(f"--reward {spec}: {path} has no function {name!r}")
    return function


def build_rewards(specs: Sequence[str], weights: Sequence[float], *, answer_column: str = "answer",
                  regex: str | None = None, length_target: int = 64) -> list[Reward]:
    """The rewards named by `--reward` (built-in names or file.py:function) with their weights."""
    if weights and len(weights) != len(specs):
        raise LorakitError(
            f"--reward-weights: expected {len(specs)} weights (one per --reward), got {len(weights)}"
        )
    rewards = []
    for i, spec in enumerate(specs):
        if spec == "exact_match":
            function, name = exact_match_reward(answer_column), spec
        elif spec == "regex":
            if regex is None:
                raise LorakitError("--reward regex: needs --reward-regex PATTERN")
            function, name = regex_reward(regex), spec
        elif spec == "length":
            function, name = length_reward(length_target), spec
        else:
            function = load_user_function(spec)
            name = spec.rpartition(":")[2]
        rewards.append(Reward(name, function, float(weights[i]) if weights else 1.0))
    names = [r.name for r in rewards]
    if len(set(names)) != len(names):
        raise LorakitError(f"--reward: each reward is logged under its name; {names} repeats one")
    return rewards


def score(rewards: Sequence[Reward], prompts: Sequence[Any], completions: Sequence[str],
          columns: Mapping[str, Sequence[Any]], step: int) -> tuple[list[float], dict[str, float]]:
    """(weighted sum per completion, mean of each reward as "reward_<name>"); a function that returns the
    wrong number of values or a non-number is named with `step`."""
    total = [0.0] * len(completions)
    means = {}
    for reward in rewards:
        values = reward.function(list(prompts), list(completions), **{k: list(v) for k, v in columns.items()})
        values = _checked(values, len(completions), reward.name, step)
        total = [t + reward.weight * v for t, v in zip(total, values)]
        means[f"reward_{reward.name}"] = sum(values) / len(values)
    return total, means


def _checked(values: Any, expected: int, name: str, step: int) -> list[float]:
    where = f"step {step}: reward {name}"
    try:
        values = list(values)
    except TypeError:
        raise LorakitError(f"{where} returned {type(values).__name__}, expected a list of "
                           f"{expected} numbers") from None
    if len(values) != expected:
        raise LorakitError(f"{where} returned {len(values)} values for {expected} completions")
    for i, value in enumerate(values):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number and hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # a numpy/torch scalar
            value = value.item()
            number = isinstance(value, (int, float))
        if not number or not math.isfinite(value):
            raise LorakitError(f"{where} returned {value!r} for completion {i}, expected a finite number")
        values[i] = float(value)
    return values
