"""`lorakit grpo` / `lorakit.train.grpo`: the loss against a reference implementation, rewards, data, bad
input, sampling, whole runs on the tiny model and the CLI."""

from __future__ import annotations

import json
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
def test_loss_and_gradients_equal_a_reference_implementation(
    tiny_chat_model_dir, prompts, tokenizer, loss_type
) -> None:
    from transformers import AutoModelForCausalLM

    beta, max_len = 0.3, 6
    config = _config(
        tiny_chat_model_dir,
        prompts,
        loss_type=loss_type,
        beta=beta,
        num_iterations=2,
        epsilon=0.1,
        epsilon_high=0.15,
        max_completion_length=max_len,
        reward=["exact_match", "length"],
        reward_weights=[1.0, 0.5],
        length_target=4,
    )
    objective = GRPOObjective(config)
    examples = objective.datasets(tokenizer).train[:3]
    torch.manual_seed(0)
    policy = objective.build(
        AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir), str(tiny_chat_model_dir)
    )
    perturb_adapter(policy, seed=1, scale=0.3)  # the policy differs from the reference (KL > 0)
    # Fixed completions: right answers (+ EOS), wrong ones, long ones; prompt 2's group all wrong (zero
    # variance).
    answers = [e["columns"]["answer"] for e in examples]
    texts = [[answers[0], "1999", answers[0] + "!!!!", "x"], ["no", "nope", "no", "no"],
             [answers[2], answers[2], "2001-01-0", "year 2000"]]
    completions = []
    for group in texts:
        for text in group:
            tokens = tokenizer(text, add_special_tokens=False)["input_ids"][: max_len - 1] + [
                tokenizer.eos_token_id
            ]
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


# ---- rewards ------------------------------------------------------------------------------------------

def test_builtin_and_user_rewards_are_weighted_summed_and_each_logged(tmp_path) -> None:
    file = tmp_path / "my_rewards.py"
    file.write_text("def shout(prompts, completions, level, **columns):\n"
                    "    return [float(c.isupper()) * l for c, l in zip(completions, level)]\n")
    rewards = build_rewards(
        ["exact_match", "regex", "length", f"{file}:shout"], [1, 2, 0.5, 1], regex=r"^\d{4}$", length_target=4
    )
    total, means = score(
        rewards, ["p1", "p2"], ["1999", "ABCDEFGH"], {"answer": ["1999 ", "x"], "level": [1.0, 3.0]}, step=1
    )
    # "1999": exact 1, regex 1 (×2), length 0, shout 0. "ABCDEFGH": length −4/4 (×0.5), shout 1 × level 3.
    assert total == [3.0, 2.5]
    assert means == {
        "reward_exact_match": 0.5,
        "reward_regex": 0.5,
        "reward_length": -0.5,
        "reward_shout": 1.5,
    }


@pytest.mark.parametrize(("body", "message"), [
    ("[1.0]", "step 7: reward bad returned 1 values for 2 completions"),
    ("[1.0, 'x']", "step 7: reward bad returned 'x' for completion 1, expected a finite number"),
    ("[1.0, float('nan')]", "step 7: reward bad returned nan for completion 1, expected a finite number"),
    ("None", "step 7: reward bad returned NoneType, expected a list of 2 numbers"),
])
def test_a_reward_of_wrong_length_or_not_numbers_names_the_step_and_function(tmp_path, body, message) -> None:
    file = tmp_path / "r.py"
    file.write_text(f"def bad(prompts, completions, **columns):\n    return {body}\n")
    with pytest.raises(LorakitError) as err:
        score(build_rewards([f"{file}:bad"], []), ["p", "q"], ["a", "b"], {}, step=7)
    assert str(err.value) == message


# ---- prompt data ----------------------------------------------------------------------------------------

def _rendered(tokenizer, prompt) -> list[int]:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]


def test_prompts_from_every_file_type_as_strings_or_messages_keep_their_columns(tmp_path, tokenizer) -> None:
    import datasets

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]
    rows = [
        {"prompt": "What is 2+2?", "answer": "4", "level": "1"},
        {"prompt": messages, "answer": "hi", "level": "2"},
    ]
    files = [_write(tmp_path / "p.jsonl", rows), tmp_path / "p.json", tmp_path / "p.csv"]
    files[1].write_text(json.dumps(rows), encoding="utf-8")
    files[2].write_text('prompt,answer,level\nWhat is 2+2?,4,1\n"' + json.dumps(messages).replace('"', '""')
                        + '",hi,2\n', encoding="utf-8")
    for path in files:
        loaded = load_prompts(str(path), tokenizer, max_prompt_len=200)
        assert [r["prompt"] for r in loaded] == ["What is 2+2?", messages], path.name
        assert [r["columns"] for r in loaded] == [
            {"answer": "4", "level": "1"},
            {"answer": "hi", "level": "2"},
        ]
        assert [r["prompt_ids"] for r in loaded] == [_rendered(tokenizer, r["prompt"]) for r in rows]
    parquet = tmp_path / "p.parquet"
    datasets.Dataset.from_list([{"prompt": "Hello", "gold": 3}]).to_parquet(str(parquet))
    assert [
        (r["prompt"], r["columns"]) for r in load_prompts(str(parquet), tokenizer, max_prompt_len=200)
    ] == [("Hello", {"gold": 3})]
    chat = _write(
        tmp_path / "chat.jsonl", [{"messages": messages + [{"role": "assistant", "content": "hi"}]}]
    )
    assert [(r["prompt"], r["columns"]) for r in load_prompts(str(chat), tokenizer, max_prompt_len=200)] == [
        (messages, {"answer": "hi"})]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"question": "x"},
            'bad.jsonl line 2: expected a "prompt" (a string or messages) or a "messages" column',
        ),
        ({"prompt": "  "}, "bad.jsonl line 2: empty prompt"),
        ({"prompt": [{"role": "user"}]}, 'bad.jsonl line 2: prompt message 1: missing field "content"'),
        ({"prompt": "no answer"}, 'bad.jsonl line 2: missing column "answer"'),
        ({"prompt": "long " * 300, "answer": "x"}, "bad.jsonl line 2: the prompt is"),
    ],
)
def test_bad_prompt_rows_fail_with_the_file_and_line(tmp_path, tokenizer, row, message) -> None:
    path = _write(tmp_path / "bad.jsonl", [{"prompt": "fine", "answer": "a"}, row])
    with pytest.raises(DataError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        load_prompts(str(path), tokenizer, max_prompt_len=100, required=("answer",))


# ---- bad input before the model loads ---------------------------------------------------------------------

def _lorakit(capsys, *args: str) -> tuple[int, str]:
    """Run the CLI in this process (as `lorakit ...` would): (exit code, stderr)."""
    from lorakit.cli.main import main

    with pytest.raises(SystemExit) as exited:
        main(list(args))
    return exited.value.code, capsys.readouterr().err


def test_bad_input_fails_in_one_line_before_the_model_loads(tmp_path, tiny_chat_model_dir, prompts, capsys,
                                                             monkeypatch) -> None:
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("lorakit.train.trainer.load_base_model", no_model)
    rewards = tmp_path / "rewards.py"
    rewards.write_text("def ok(prompts, completions, **columns):\n    return [0.0] * len(completions)\n")
    no_answer = _write(tmp_path / "q.jsonl", [{"prompt": "p"}])
    common = [
        "grpo",
        "--model",
        str(tiny_chat_model_dir),
        "--data",
        str(prompts["train"]),
        "--output",
        str(tmp_path / "o"),
    ]
    cases = [
        (
            ["--num-generations", "1"],
            "--num-generations: expected at least 2 (advantages compare the completions of a prompt), got 1",
        ),
        (["--reward", "missing.py:f"], "--reward missing.py:f: reward file missing.py does not exist"),
        (["--reward", f"{rewards}:nope"], f"--reward {rewards}:nope: {rewards} has no function 'nope'"),
        (["--reward", "regex"], "--reward regex: needs --reward-regex PATTERN"),
        (
            ["--reward", "exact_match,length", "--reward-weights", "1"],
            "--reward-weights: expected 2 weights (one per --reward), got 1",
        ),
        (
            ["--data", str(no_answer)],
            'q.jsonl line 1: missing column "answer" (the exact_match reward compares with '
            "it; see --answer-column)",
        ),
    ]
    for extra, message in cases:
        code, err = _lorakit(capsys, *common, *extra, "--overwrite")
        assert code == 1 and err.strip() == f"error: {message}", extra


# ---- sampling ---------------------------------------------------------------------------------------------

def test_sampling_is_seeded_per_row_and_stops_at_stop_strings(tiny_chat_model_dir, tokenizer) -> None:
    from transformers import AutoModelForCausalLM

    model = lorakit.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir),
                                   lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    prompt = _rendered(tokenizer, "Hello")
    first = generate_rows(model, tokenizer, [prompt] * 3, max_tokens=6, temperature=1.0, seeds=[1, 2, 3])
    # Row 0 alone, with the same seed, draws the same tokens: a row depends on its seed, not on the batch.
    again = generate_rows(model, tokenizer, [prompt], max_tokens=6, temperature=1.0, seeds=[1])
    assert again[0].tokens == first[0].tokens and len(first[0].tokens) == 6
    assert first[0].tokens != first[1].tokens and first[0].finish_reason == "length"
    assert first[0].text == tokenizer.decode(first[0].tokens, skip_special_tokens=True)
    # A stop string made of the second token's text ends the row before it.
    stop = tokenizer.decode(first[0].tokens[1:2])
    cut = generate_rows(model, tokenizer, [prompt], max_tokens=6, temperature=1.0, seeds=[1], stop=[stop])[0]
    assert cut.finish_reason == "stop" and stop not in cut.text and first[0].text.startswith(cut.text)



def test_the_samples_of_one_prompt_share_its_prefill(tiny_chat_model_dir, tokenizer) -> None:
    """G rows of one prompt cost one prompt forward: the first forward sees each distinct prompt once, and
    every row still draws what it draws alone with its seed."""
    from transformers import AutoModelForCausalLM

    model = lorakit.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir),
                                   lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    hello, bye = _rendered(tokenizer, "Hello"), _rendered(tokenizer, "Goodbye, see you")
    shapes: list[tuple[int, ...]] = []
    embeddings = model.get_input_embeddings()
    hook = embeddings.register_forward_hook(lambda m, args, out: shapes.append(args[0].shape))
    together = generate_rows(model, tokenizer, [hello, bye, hello, hello], max_tokens=5, temperature=1.0,
                             seeds=[4, 5, 6, 7])
    hook.remove()
    assert shapes[0] == (2, max(len(hello), len(bye)))
    assert all(shape[1] == 1 for shape in shapes[1:])  # then one token per row and step
    for prompt, seed, row in zip([hello, bye, hello, hello], [4, 5, 6, 7], together):
        alone = generate_rows(model, tokenizer, [prompt], max_tokens=5, temperature=1.0, seeds=[seed])[0]
        assert alone.tokens == row.tokens
    assert len({tuple(row.tokens) for row in together}) > 1

# ---- whole runs on the tiny model ------------------------------------------------------------------------
# The tiny random model never writes a right date: the length reward (target 24 characters) gives its
# completions rewards that differ, so groups have variance and the adapter moves.

def _metrics(output: Path, kind: str) -> list[dict]:
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == kind]


def test_run_logs_rewards_kl_and_samples_writes_outputs_and_builds_one_model(
    tmp_path, tiny_chat_model_dir, prompts, monkeypatch
) -> None:
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    built = []
    original = LlamaForCausalLM.__init__

    def counting(self, *args, **kwargs):
        built.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "__init__", counting)
    result = train_grpo(_config(tiny_chat_model_dir, prompts, tmp_path / "run", beta=0.5,
                                reward=["exact_match", "length"], length_target=24))
    # β > 0, and the reference is the adapter switched off: one model was built, and it holds only the base
    # weights and the adapter.
    assert len(built) == 1
    base_params = sum(
        p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir).parameters()
    )
    report = result.report
    assert report["total_params"] == base_params + report["trainable_params"]
    out = result.output_dir
    for name in ("adapter/adapter_model.safetensors", "metrics.jsonl", "loss_curve.png", "report.json",
                 "grpo_config.yaml"):
        assert (out / name).is_file(), name
    train, evals = _metrics(out, "train"), _metrics(out, "eval")
    assert [r["step"] for r in train] == [1, 2] and [r["step"] for r in evals] == [2]
    for record in train:
        assert {
            "reward",
            "reward_std",
            "reward_exact_match",
            "reward_length",
            "kl",
            "completion_length",
            "clip_ratio",
            "zero_variance_groups",
            "truncated",
        } <= record.keys()
        assert record["reward_exact_match"] == 0 and -1 <= record["reward_length"] < 0
        assert [set(s) for s in record["samples"]] == [{"completion", "reward"}] * 2
    # Step 1 samples from the fresh adapter, which is the reference: KL 0; step 2's policy has moved.
    assert train[0]["kl"] == pytest.approx(0, abs=1e-6) and train[1]["kl"] > 1e-6
    assert train[0]["completion_length"] == 4 and train[0]["truncated"] == 1
    assert report["method"] == "grpo" and report["train_prompts"] == 8 and report["groups_sampled"] == 4
    assert evals[0]["val_loss"] == -evals[0]["val_reward"] and report["test_rows"] == 4
    assert report["exact_match_base"] == report["exact_match_adapter"] == 0
    assert report["reference"] == "base model (adapter disabled)"


def test_resume_between_reuses_of_a_batch_matches_an_uninterrupted_run(
    tmp_path, tiny_chat_model_dir, prompts
) -> None:
    options = dict(
        num_iterations=2,
        max_steps=4,
        save_every=1,
        eval_every=4,
        reward=["length"],
        length_target=24,
        validation_data=None,
        test_data=None,
    )
    whole = train_grpo(_config(tiny_chat_model_dir, prompts, tmp_path / "a", **options))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_grpo(
            _config(tiny_chat_model_dir, prompts, tmp_path / "b", **options), callbacks=[CrashAfter(3)]
        )
    # Step 3's checkpoint holds the second batch of completions, used once of μ = 2 times.
    resumed = train_grpo(_config(tiny_chat_model_dir, prompts, tmp_path / "b", resume=True, **options))
    for a, b in zip(_metrics(whole.output_dir, "train"), _metrics(tmp_path / "b", "train"), strict=True):
        assert a["step"] == b["step"] and a["samples"] == b["samples"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["reward"] == b["reward"]
    train = _metrics(whole.output_dir, "train")
    assert train[0]["samples"] == train[1]["samples"] != train[2]["samples"] == train[3]["samples"]
    from safetensors.torch import load_file

    expected = load_file(str(whole.adapter_dir / "adapter_model.safetensors"))
    got = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert all(torch.allclose(got[k], expected[k], atol=1e-6, rtol=0) for k in expected)


def test_continuing_an_adapter_uses_its_frozen_copy_as_the_reference(
    tmp_path, tiny_chat_model_dir, prompts
) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    start = lorakit.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir),
                                   lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    start.save_pretrained(tmp_path / "start")
    result = train_grpo(
        _config(
            tiny_chat_model_dir,
            prompts,
            tmp_path / "run",
            adapter=str(tmp_path / "start"),
            beta=0.5,
            reward=["length"],
            length_target=24,
            validation_data=None,
            test_data=None,
        )
    )
    train = _metrics(result.output_dir, "train")
    # The starting adapter is not the identity, yet step 1's KL is 0: the reference is that adapter, frozen.
    assert train[0]["kl"] == pytest.approx(0, abs=1e-6) and train[1]["kl"] > 1e-6
    assert "reference" in result.model.peft_config and result.report["reference"].startswith(
        "starting adapter"
    )
    before, after = load_file(str(tmp_path / "start" / "adapter_model.safetensors")), load_file(
        str(result.adapter_dir / "adapter_model.safetensors"))
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)


def test_cli_runs_and_a_reward_failing_at_run_time_names_step_and_function(
    tmp_path, tiny_chat_model_dir, prompts, capsys
) -> None:
    rewards = tmp_path / "rewards.py"
    rewards.write_text(
        "def short(prompts, completions, **columns):\n    return [-len(c) for c in completions]\n\n"
        "def broken(prompts, completions, **columns):\n    return [1.0] * (len(completions) - 1)\n"
    )
    common = [
        "grpo",
        "--model",
        str(tiny_chat_model_dir),
        "--data",
        str(prompts["train"]),
        "--max-steps",
        "1",
        "--batch-size",
        "2",
        "--num-generations",
        "2",
        "--max-completion-length",
        "3",
    ]
    code, err = _lorakit(capsys, *common, "--output", str(tmp_path / "ok"), "--reward", f"{rewards}:short",
                         "--loss-type", "dapo")
    assert code == 0, err
    report = json.loads((tmp_path / "ok" / "report.json").read_text())
    assert report["loss_type"] == "dapo" and report["rewards"] == ["short"]
    code, err = _lorakit(capsys, *common, "--output", str(tmp_path / "bad"), "--reward", f"{rewards}:broken")
    # The model had loaded (its progress output comes first); the error is still one line, without a
    # traceback.
    assert code == 1 and err.endswith("error: step 1: reward broken returned 3 values for 4 completions\n")
    assert "Traceback" not in err


@pytest.mark.slow
def test_a_short_run_raises_the_mean_reward(tmp_path, default_model_dir, prompts) -> None:
    from tiny_models import tiny_llama
    from transformers import AutoTokenizer

    # A tiny random model whose next-token distributions are peaked (large initial weights, temperature 0.3):
    # each prompt's samples are a handful of tokens, some starting with a letter from a to m (the regex
    # reward pays those), so the policy gradient can move probability between them within a few steps.
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    model = tiny_llama(
        perturb=False,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.5,
    )
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    config = _config(tmp_path / "model", prompts, tmp_path / "run", max_steps=24, eval_every=24, batch_size=4,
                     num_generations=8, max_completion_length=1, temperature=0.3, learning_rate=2e-2,
                     reward=["regex"], reward_regex=r"^\s?[a-m]", test_data=None)
    train = _metrics(train_grpo(config).output_dir, "train")
    first, last = [r["reward"] for r in train[:6]], [r["reward"] for r in train[-6:]]
    assert statistics.mean(last) > statistics.mean(first) + 0.2, (first, last)
