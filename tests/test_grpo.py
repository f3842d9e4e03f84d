"""`lorakit grpo` / `lorakit.train.grpo`: the loss against a reference implementation, rewards, data, bad
input, sampling, whole runs on the tiny model and the CLI."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_models import CrashAfter, perturb_adapter

import lorakit
from lorakit.errors import DataError, LorakitError
from lorakit.train.grpo import GRPOObjective, train_grpo
from lorakit.train.grpo_config import GRPOConfig
from lorakit.train.grpo_loss import group_advantages
from lorakit.train.prompt_data import load_prompts
from lorakit.train.rewards import build_rewards, score
from lorakit.train.sampling import Completion, generate_rows

GROUP = 4


@pytest.fixture(scope="module")
def tokenizer(tiny_chat_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_chat_model_dir)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small train/validation/test files of the bundled date task (chat rows: the answer is the last turn)."""
    from lorakit.train.data import bundled_dataset_path

    directory = tmp_path_factory.mktemp("grpo-prompts")
    paths = {}
    for split, size in (("train", 8), ("validation", 4), ("test", 4)):
        lines = bundled_dataset_path(split).read_text(encoding="utf-8").splitlines()[:size]
        paths[split] = directory / f"{split}.jsonl"
        paths[split].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths


def _config(model_dir: Path, data: dict[str, Path], output: Path | None = None, **overrides) -> GRPOConfig:
    options = dict(model=str(model_dir), data=str(data["train"]), validation_data=str(data["validation"]),
                   test_data=str(data["test"]), output=str(output or "unused"), max_steps=2, eval_every=2,
                   batch_size=2, num_generations=GROUP, max_completion_length=4, learning_rate=5e-3,
                   warmup_steps=0, seed=3)
    options.update(overrides)
    return GRPOConfig.from_options(options)


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---- the loss and its gradients against a straightforward implementation -----------------------------

def _reference_token_logps(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log π(o_t | q, o_<t) of one unpadded row from the model's full logits."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
    return F.log_softmax(logits, dim=-1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


def _reference_loss(logps, old, ref, rewards, loss_type, beta, eps_low, eps_high, max_len):
    """The papers' formulas with plain loops over groups, completions and tokens (lists of 1-D tensors)."""
    advantages, kept = [], []
    for start in range(0, len(rewards), GROUP):
        group = rewards[start:start + GROUP]
        mean, std = statistics.mean(group), statistics.stdev(group)
        same = len(set(group)) == 1
        for r in group:
            advantages.append(0.0 if same else (r - mean) / (1.0 if loss_type == "dr_grpo" else std + 1e-4))
            kept.append(not (same and loss_type == "dapo"))
    per_row = []
    for lp, o, rf, a in zip(logps, old, ref, advantages):
        ratio = torch.exp(lp - o)
        token = -torch.minimum(ratio * a, ratio.clamp(1 - eps_low, 1 + eps_high) * a)
        token = token + beta * (torch.exp(rf - lp) - (rf - lp) - 1)
        per_row.append(token)
    if loss_type == "grpo":
        return sum(t.mean() for t in per_row) / len(per_row)
    if loss_type == "dr_grpo":
        return sum(t.sum() for t in per_row) / (len(per_row) * max_len)
    return sum(t.sum() for t, k in zip(per_row, kept) if k) / sum(len(t) for t, k in zip(per_row, kept) if k)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_loss_and_gradients_equal_a_reference_implementation(tiny_chat_model_dir, prompts, tokenizer, loss_type) -> None:
    from transformers import AutoModelForCausalLM

    beta, max_len = 0.3, 6
    config = _config(tiny_chat_model_dir, prompts, loss_type=loss_type, beta=beta, num_iterations=2, epsilon=0.1,
                     epsilon_high=0.15, max_completion_length=max_len, reward=["exact_match", "length"],
                     reward_weights=[1.0, 0.5], length_target=4)
    objective = GRPOObjective(config)
    examples = objective.datasets(tokenizer).train[:3]
    torch.manual_seed(0)
    policy = objective.build(AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir), str(tiny_chat_model_dir))
    perturb_adapter(policy, seed=1, scale=0.3)  # the policy differs from the reference (KL > 0)
    # Fixed completions: right answers (+ EOS), wrong ones, long ones; prompt 2's group all wrong (zero variance).
    answers = [e["columns"]["answer"] for e in examples]
    texts = [[answers[0], "1999", answers[0] + "!!!!", "x"], ["no", "nope", "no", "no"],
             [answers[2], answers[2], "2001-01-0", "year 2000"]]
    completions = []
    for group in texts:
        for text in group:
            tokens = tokenizer(text, add_special_tokens=False)["input_ids"][:max_len - 1] + [tokenizer.eos_token_id]
            completions.append(Completion(tokens, text, "stop"))
    prompt_ids = [e["prompt_ids"] for e in examples for _ in range(GROUP)]
    with torch.no_grad():
        old = [_reference_token_logps(policy, p, c.tokens) for p, c in zip(prompt_ids, completions)]
    batch = objective.scored_batch(examples, completions)
    perturb_adapter(policy, seed=2, scale=0.3)  # an optimizer step later: ratios move away from 1, some clip

    total, figures = objective.loss(batch)
    loss = total / objective.count(batch)
    params = [p for p in policy.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)

    base = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir)  # the reference, built separately here
    with torch.no_grad():
        ref = [_reference_token_logps(base, p, c.tokens) for p, c in zip(prompt_ids, completions)]
    logps = [_reference_token_logps(policy, p, c.tokens) for p, c in zip(prompt_ids, completions)]
    rewards = [float(t.strip() == a) + 0.5 * -min(1.0, max(0, len(t) - 4) / 4)
               for group, a in zip(texts, answers) for t in group]
    expected = _reference_loss(logps, old, ref, rewards, loss_type, beta, 0.1, 0.15, max_len)
    expected_grads = torch.autograd.grad(expected, params)

    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    for got, want in zip(grads, expected_grads):
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    assert sum(g.abs().sum().item() for g in grads) > 0
    assert 0 < figures["clip_ratio"] < 1 and figures["kl"] > 0
    assert figures["zero_variance_groups"] == pytest.approx(1 / 3)
    assert figures["reward"] == pytest.approx(statistics.mean(rewards))
    assert figures["reward_exact_match"] == pytest.approx(3 / 12)


def test_equal_rewards_give_exactly_zero_advantages_and_are_counted() -> None:
    rewards = torch.tensor([0.3, 0.3, 0.3, 0.3, 1.0, 0.0, 0.0, 1.0])
    scaled, zero = group_advantages(rewards, 4, scale=True)
    assert zero.tolist() == [True, False]
    assert scaled[:4].tolist() == [0.0] * 4
    std = statistics.stdev([1.0, 0.0, 0.0, 1.0])
    a = 0.5 / (std + 1e-4)
    assert scaled[4:].tolist() == pytest.approx([a, -a, -a, a], rel=1e-6)
    centred, _ = group_advantages(rewards, 4, scale=False)
    assert centred[4:].tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5])
