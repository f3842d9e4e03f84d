"""`lorakit dpo` / `lorakit.train.dpo`: the loss, the data, the reference, whole runs and the CLI."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_models import CrashAfter
from torch._dynamo.utils import counters

import lorakit
from lorakit.errors import DataError
from lorakit.train.config import DPOConfig
from lorakit.train.dpo import train_dpo
from lorakit.train.dpo_loss import PreferenceLoss, dpo_loss
from lorakit.train.preference_data import (
    build_preference_datasets,
    bundled_preference_path,
    collate_pairs,
    encode_pair,
)
from lorakit.train.tokenize import encode_example

REPO = Path(__file__).resolve().parents[1]
LN2 = math.log(2)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small train/validation files cut from the bundled preference pairs."""
    directory = tmp_path_factory.mktemp("pairs")
    paths = {}
    for split, size in (("train", 48), ("validation", 16)):
        lines = bundled_preference_path(split).read_text(encoding="utf-8").splitlines()[:size]
        paths[split] = directory / f"{split}.jsonl"
        paths[split].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths


@pytest.fixture(scope="module")
def tokenizer(tiny_chat_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_chat_model_dir)


def _config(output: Path, model_dir: Path, data: dict[str, Path], **overrides) -> DPOConfig:
    options = dict(
        model=str(model_dir),
        data=str(data["train"]),
        validation_data=str(data["validation"]),
        output=str(output),
        max_steps=6,
        eval_every=3,
        save_every=2,
        batch_size=4,
        learning_rate=5e-3,
        warmup_steps=0,
        seed=3,
    )
    options.update(overrides)
    return DPOConfig.from_options(options)


def _metrics(output: Path, kind: str) -> list[dict]:
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == kind]


# ---- the loss on fixed log-probabilities ---------------------------------------------------------------
# Pair 1: policy (chosen, rejected) = (-5, -7), reference (-6, -6.5): log-ratios +1 and -0.5, h = 1.5.
# Pair 2: policy (-9, -4), reference (-8, -5): log-ratios -1 and +1, h = -2. With β = 0.5, β·h = 0.75, -1.
POLICY_CHOSEN, POLICY_REJECTED = [-5.0, -9.0], [-7.0, -4.0]
REF_CHOSEN, REF_REJECTED = [-6.0, -8.0], [-6.5, -5.0]


def _loss(loss_type: str = "sigmoid", label_smoothing: float = 0.0, beta: float = 0.5):
    tensors = [
        torch.tensor(v, dtype=torch.float64)
        for v in (POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED)
    ]
    tensors[0].requires_grad_(True)
    losses, chosen, rejected = dpo_loss(
        *tensors, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing
    )
    return losses, chosen, rejected, tensors[0]


def test_sigmoid_loss_rewards_and_gradient_match_hand_computed_values() -> None:
    losses, chosen, rejected, policy_chosen = _loss("sigmoid")
    # -log σ(0.75) = log(1 + e^-0.75) = log(1.4723665527) ; -log σ(-1) = log(1 + e) = log(3.7182818285)
    assert losses.tolist() == pytest.approx([0.38687100611489994, 1.3132616875182228], abs=1e-12)
    # rewards β·(log π − log π_ref): 0.5·(+1), 0.5·(-1) chosen; 0.5·(-0.5), 0.5·(+1) rejected
    assert chosen.tolist() == [0.5, -0.5] and rejected.tolist() == [-0.25, 0.5]
    assert not chosen.requires_grad and not rejected.requires_grad
    # ∂L/∂log π(chosen) = -β·σ(-β·h): -0.5·σ(-0.75) = -0.5/(1 + e^0.75) = -0.5/3.117000017 ; -0.5·σ(1) =
    # -0.5/(1 + e^-1)
    losses.sum().backward()
    assert policy_chosen.grad.tolist() == pytest.approx(
        [-0.16041065041230348, -0.36552928931500245], abs=1e-12
    )


def test_label_smoothing_mixes_in_the_flipped_preference() -> None:
    losses, *_ = _loss("sigmoid", label_smoothing=0.1)
    # 0.9·log(1 + e^-0.75) + 0.1·log(1 + e^0.75) = 0.9·0.386871006 + 0.1·1.136871006 (= 0.386871006 +
    # 0.1·0.75)
    # 0.9·log(1 + e) + 0.1·log(1 + e^-1) = 0.9·1.313261688 + 0.1·0.313261688 (= 1.313261688 − 0.1·1)
    assert losses.tolist() == pytest.approx([0.46187100611489995, 1.2132616875182227], abs=1e-12)


def test_ipo_loss_is_the_squared_distance_to_one_over_two_beta() -> None:
    losses, chosen, rejected, _ = _loss("ipo")
    # (h − 1/(2·0.5))²: (1.5 − 1)² = 0.25 ; (−2 − 1)² = 9
    assert losses.tolist() == pytest.approx([0.25, 9.0], abs=1e-12)
    assert chosen.tolist() == [0.5, -0.5]
    with pytest.raises(ValueError, match="loss_type: expected sigmoid or ipo"):
        _loss("hinge")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"beta": 0.0}, "--beta: expected a positive number"),
        ({"loss_type": "hinge"}, "--loss-type: expected sigmoid or ipo"),
        ({"label_smoothing": 0.5}, r"--label-smoothing: expected a probability in \[0, 0.5\)"),
        ({"loss_type": "ipo", "label_smoothing": 0.1}, "--label-smoothing: only --loss-type sigmoid uses it"),
        ({"max_prompt_len": 256}, r"--max-prompt-len: expected less than --max-seq-len \(256\)"),
        ({"batch_size": 0}, "--batch-size: expected a positive integer"),
        (
            {"adapter": "runs/sft", "r": 64},
            r"--adapter runs/sft brings its own LoRA settings .*; --r cannot be set",
        ),
        (
            {"adapter": "runs/sft", "use_dora": True, "lora_alpha": 3},
            "; --lora-alpha, --use-dora cannot be set with it",
        ),
    ],
)
def test_impossible_options_are_refused_naming_the_option(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DPOConfig.from_options(overrides)


# ---- data --------------------------------------------------------------------------------------------


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


GOOD = {"prompt": "Normalize 5 March 2021", "chosen": "2021-03-05", "rejected": "The date is March 5, 2021."}


@pytest.mark.parametrize(
    ("bad", "options", "message"),
    [
        ({"prompt": "p", "rejected": "r"}, {}, 'line 2: missing field "chosen"'),
        ({"prompt": "p", "chosen": "c"}, {}, 'line 2: missing field "rejected"'),
        ({"chosen": "c", "rejected": "r"}, {}, 'line 2: missing field "prompt"'),
        (
            {"prompt": "p", "chosen": "2021-03-05", "rejected": " 2021-03-05"},
            {},
            'line 2: "chosen" and "rejected" are identical',
        ),
        (
            {"prompt": "p", "chosen": 5, "rejected": "r"},
            {},
            'line 2: "chosen" must be a string or a list of messages, got number',
        ),
        ({"prompt": "p", "chosen": "", "rejected": "r"}, {}, 'line 2: empty "chosen"'),
        (
            {"prompt": "p", "chosen": [{"role": "user", "content": "x"}], "rejected": "r"},
            {},
            'line 2: "chosen" has no assistant message',
        ),
        (
            {**GOOD, "prompt": "word " * 60},
            {"max_seq_len": 64},
            r"line 2: the prompt has 9\d tokens, leaving no room for the answers within max_seq_len=64",
        ),
        (
            {**GOOD, "prompt": "word " * 60},
            {"max_prompt_len": 60},
            r"line 2: the prompt has 9\d tokens, more than max_prompt_len=60",
        ),
        (
            {"prompt": "p", "chosen": "same start" * 20 + " A", "rejected": "same start" * 20 + " B"},
            {"max_seq_len": 64},
            'line 2: "chosen" and "rejected" are identical within max_seq_len=64',
        ),
    ],
)
def test_bad_rows_fail_with_the_file_and_line(
    tmp_path, tokenizer, bad: dict, options: dict, message: str
) -> None:
    path = _write(tmp_path / "prefs.jsonl", [GOOD, bad])
    with pytest.raises(DataError, match=rf"^prefs\.jsonl {message}"):
        build_preference_datasets(path, tokenizer, **options)


def test_answers_are_masked_exactly_as_sft_masks_completions(tmp_path, tokenizer) -> None:
    record = json.loads(bundled_preference_path("train").read_text().splitlines()[0])
    example = encode_pair(record, tokenizer, max_seq_len=256)
    for side in ("chosen", "rejected"):
        sft = encode_example(
            {"prompt": record["prompt"], "completion": record[side]}, tokenizer, max_seq_len=256
        )
        assert example[f"{side}_input_ids"] == sft["input_ids"] and example[f"{side}_labels"] == sft["labels"]
    learned = [t for t, label in zip(example["chosen_input_ids"], example["chosen_labels"]) if label != -100]
    assert tokenizer.decode(learned) == record["chosen"] + "<|im_end|>"
    # A long answer is cut to max_seq_len and counted, as SFT does with rows.
    long = {**GOOD, "rejected": "The date is March 5, 2021. " * 20}
    train, _, stats = build_preference_datasets(
        _write(tmp_path / "long.jsonl", [GOOD, long]), tokenizer, max_seq_len=64
    )
    assert stats["truncated_pairs"] == 1 and len(train[1]["rejected_input_ids"]) == 64


def test_csv_rows_with_message_lists_as_json_strings(tmp_path, tokenizer) -> None:
    import csv

    path = tmp_path / "prefs.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["prompt", "chosen", "rejected"])
        writer.writerow([json.dumps([{"role": "user", "content": "Normalize 5 March 2021"}]),
                         json.dumps([{"role": "assistant", "content": "2021-03-05"}]), "03/05/2021"])
    [pair], _, _ = build_preference_datasets(path, tokenizer)
    expected = encode_pair(GOOD | {"rejected": "03/05/2021"}, tokenizer, max_seq_len=256)
    assert pair["chosen_input_ids"] == expected["chosen_input_ids"]


# ---- log-probs and the reference ---------------------------------------------------------------------


def test_sequence_logps_sum_answer_tokens_in_one_pass_and_reference_is_the_base(
    tiny_chat_model_dir, tokenizer
) -> None:
    from transformers import AutoModelForCausalLM

    records = [json.loads(line) for line in bundled_preference_path("train").read_text().splitlines()[:3]]
    batch = collate_pairs([encode_pair(r, tokenizer, 256) for r in records], tokenizer.pad_token_id)
    base = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir).eval()
    torch.manual_seed(0)
    policy = lorakit.get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir),
        lorakit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
    )
    loss = PreferenceLoss(policy, beta=0.1)

    rows_seen = []
    hook = policy.get_base_model().model.register_forward_hook(
        lambda m, args, kw, out: rows_seen.append(kw["input_ids"].shape[0]), with_kwargs=True
    )
    flat = [batch[k].reshape(6, -1) for k in ("input_ids", "attention_mask", "labels")]
    with torch.no_grad():
        logps = loss.sequence_logps(*flat)
        reference = loss.reference_logps(batch["input_ids"], batch["attention_mask"], batch["labels"])
    hook.remove()
    # A prompt prefix common to all rows may run once first, as one row (train/shared_prefix.py).
    assert [n for n in rows_seen if n > 1] == [6, 6], \
        "chosen and rejected of all pairs go through in one forward pass (policy, reference)"

    def by_hand(model: torch.nn.Module) -> torch.Tensor:
        """Σ over answer tokens of log softmax(logits)[next token], straight from the logits."""
        ids, mask, labels = flat
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
        targets = labels[:, 1:]
        token = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (token * (targets != -100)).sum(-1)

    assert torch.allclose(logps, by_hand(policy), atol=1e-4)
    # The reference is the base model, computed by the policy itself with its adapter off.
    assert torch.allclose(reference.flatten(), by_hand(base), atol=1e-4)
    assert not torch.allclose(reference.flatten(), logps, atol=1e-3)


# ---- whole runs on the tiny model ---------------------------------------------------------------------


def test_run_raises_margin_and_accuracy_and_writes_train_outputs(
    tmp_path, tiny_chat_model_dir, pairs
) -> None:
    result = train_dpo(_config(tmp_path / "run", tiny_chat_model_dir, pairs))
    out = result.output_dir
    for name in (
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "metrics.jsonl",
        "loss_curve.png",
        "report.json",
        "dpo_config.yaml",
    ):
        assert (out / name).is_file(), name
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    train, evals = _metrics(out, "train"), _metrics(out, "eval")
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6] and [r["step"] for r in evals] == [3, 6]
    # Step 1: the policy is the reference (fresh adapter), so h = 0: loss ln 2, rewards 0, accuracy 0 (ties).
    assert train[0]["loss"] == pytest.approx(LN2, abs=1e-6) and train[0]["reward_margin"] == pytest.approx(
        0, abs=1e-6
    )
    assert train[-1]["loss"] < train[0]["loss"]
    assert train[-1]["reward_margin"] > 0 and train[-1]["reward_accuracy"] > train[0]["reward_accuracy"]
    assert evals[-1]["val_reward_margin"] > evals[0]["val_reward_margin"] > 0
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] < LN2
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "dpo" and report["train_pairs"] == 48 and report["validation_pairs"] == 16
    assert (
        report["final_val_reward_accuracy"] > 0.5 and report["reference"] == "base model (adapter disabled)"
    )
    assert yaml.safe_load((out / "dpo_config.yaml").read_text())["beta"] == 0.1
    # Only the adapter changed; it is saved in PEFT's format and loads back.
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir).state_dict()
    with result.model.disable_adapter():
        assert all(
            torch.equal(base[k], v)
            for k, v in result.model.get_base_model().state_dict().items()
            if k in base
        )
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    lorakit.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir), out / "adapter"
    )


@pytest.mark.parametrize("precompute_ref", [False, True], ids=["live", "precomputed"])
def test_continuing_an_sft_adapter_uses_it_as_the_reference(
    tmp_path, tiny_chat_model_dir, pairs, precompute_ref
) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    sft = lorakit.get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir),
        lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    sft.save_pretrained(tmp_path / "sft")
    result = train_dpo(_config(tmp_path / "run", tiny_chat_model_dir, pairs, max_steps=3, eval_every=3,
                               adapter=str(tmp_path / "sft"), precompute_ref=precompute_ref))
    train = _metrics(result.output_dir, "train")
    # The starting adapter is the reference, so the first step starts at h = 0 although the adapter is not
    # the identity.
    assert train[0]["loss"] == pytest.approx(LN2, abs=1e-6) and train[-1]["loss"] < train[0]["loss"]
    assert sorted(p.name for p in result.adapter_dir.iterdir()) == [
        "README.md",  # the model card, as PEFT writes it
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert json.loads((result.adapter_dir / "adapter_config.json").read_text())["target_modules"] in (
        ["q_proj", "v_proj"],
        ["v_proj", "q_proj"],
    )
    start, trained = (
        load_file(str(tmp_path / "sft" / "adapter_model.safetensors")),
        load_file(str(result.adapter_dir / "adapter_model.safetensors")),
    )
    assert start.keys() == trained.keys() and any(not torch.equal(start[k], trained[k]) for k in start)
    assert ("reference" in result.model.peft_config) is not precompute_ref


def test_resume_with_precomputed_reference_matches_an_uninterrupted_live_run(
    tmp_path, tiny_chat_model_dir, pairs
) -> None:
    live = train_dpo(_config(tmp_path / "a", tiny_chat_model_dir, pairs))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_dpo(
            _config(tmp_path / "b", tiny_chat_model_dir, pairs, precompute_ref=True),
            callbacks=[CrashAfter(3)],
        )
    resumed = train_dpo(_config(tmp_path / "b", tiny_chat_model_dir, pairs, precompute_ref=True, resume=True))
    assert resumed.report["reference"] == "base model (adapter disabled), precomputed"
    # Precomputing changes where π_ref's log-probs come from, not their values: the runs agree step by step.
    for a, b in zip(_metrics(live.output_dir, "train"), _metrics(tmp_path / "b", "train"), strict=True):
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    expected = load_file(str(live.adapter_dir / "adapter_model.safetensors"))
    got = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert all(torch.allclose(got[k], expected[k], atol=1e-5, rtol=0) for k in expected)


# ---- the bundled pairs and the command line ------------------------------------------------------------


def test_bundled_pairs_are_what_the_script_generates_and_prefer_iso_dates() -> None:
    spec = importlib.util.spec_from_file_location(
        "make_preference_data", REPO / "scripts" / "make_preference_data.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for split, rows in script.generate().items():
        assert bundled_preference_path(split).read_text(encoding="utf-8") == script.to_jsonl(rows), split
        for row in rows:
            assert len(row["chosen"]) == 10 and row["chosen"][4] == row["chosen"][7] == "-"
            assert row["rejected"] != row["chosen"]


def _lorakit(capsys, *args: str) -> tuple[int, str]:
    """Run the CLI in this process (as `lorakit ...` would): (exit code, stderr)."""
    from lorakit.cli.main import main

    with pytest.raises(SystemExit) as exited:
        main(list(args))
    return exited.value.code, capsys.readouterr().err


def test_cli_runs_and_bad_input_gives_one_line_without_traceback(
    tmp_path, tiny_chat_model_dir, pairs, capsys
) -> None:
    common = ["dpo", "--model", str(tiny_chat_model_dir), "--validation-data", str(pairs["validation"])]
    code, err = _lorakit(
        capsys,
        *common,
        "--data",
        str(pairs["train"]),
        "--output",
        str(tmp_path / "run"),
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--loss-type",
        "ipo",
        "--beta",
        "0.5",
        "--precompute-ref",
    )
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "report.json").read_text())["loss_type"] == "ipo"

    bad = _write(tmp_path / "bad.jsonl", [GOOD, GOOD, {"prompt": "p", "chosen": "x"}])
    code, err = _lorakit(capsys, *common, "--data", str(bad), "--output", str(tmp_path / "bad"))
    assert code == 1 and err.strip() == (
        'error: bad.jsonl line 3: missing field "rejected" (preference data needs '
        '"prompt", "chosen" and "rejected")'
    )
    code, err = _lorakit(capsys, *common, "--data", str(pairs["train"]), "--beta", "-1")
    assert code == 1 and err.strip() == "error: --beta: expected a positive number, got -1.0"
    with pytest.raises(
        DataError, match="bad.jsonl line 3"
    ):  # --debug: the exception itself, for the traceback
        _lorakit(capsys, *common, "--data", str(bad), "--output", str(tmp_path / "bad"), "--debug")


def test_compiled_run_gives_the_eager_losses(tmp_path, tiny_chat_model_dir, pairs) -> None:
    # The reference pass (adapters off, no grad) runs inside the compiled decoder layers too.
    runs = {
        name: _config(
            tmp_path / name, tiny_chat_model_dir, pairs, max_steps=3, eval_every=3, compile=name == "compiled"
        )
        for name in ("eager", "compiled")
    }
    for name, config in runs.items():
        counters.clear()
        train_dpo(config)
        assert (counters["stats"]["unique_graphs"] >= 1) == (name == "compiled"), name
    eager, compiled = (_metrics(tmp_path / name, "train") for name in runs)
    assert len(compiled) == 3
    for a, b in zip(eager, compiled):
        assert abs(a["loss"] - b["loss"]) < 1e-5
    assert (
        abs(
            _metrics(tmp_path / "compiled", "eval")[-1]["val_loss"]
            - _metrics(tmp_path / "eager", "eval")[-1]["val_loss"]
        )
        < 1e-5
    )
