"""The user-facing commands around training: eval, generate, chat, compare and demo."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lorakit


def _lorakit(*args: str, stdin: str | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lorakit", *args], capture_output=True, text=True, input=stdin, timeout=timeout
    )


@pytest.fixture(scope="module")
def two_adapters(tiny_chat_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from transformers import AutoModelForCausalLM

    paths = {}
    for seed, name in enumerate(("alpha", "beta")):
        torch.manual_seed(seed)
        model = lorakit.get_peft_model(
            AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir),
            lorakit.LoraConfig(r=4, lora_alpha=64, target_modules="all-linear", init_lora_weights=False),
        )
        paths[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(paths[name])
    return paths


def test_eval_reports_loss_perplexity_and_exact_match_per_model(
    tiny_chat_model_dir, two_adapters, demo_subset
) -> None:
    done = _lorakit(
        "eval",
        "--model",
        str(tiny_chat_model_dir),
        "--data",
        str(demo_subset["test"]),
        "--json",
        "--adapter",
        f"alpha={two_adapters['alpha']}",
        "--adapter",
        f"beta={two_adapters['beta']}",
        "--max-new-tokens",
        "4",
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert [r["model"] for r in result["results"]] == ["base", "alpha", "beta"]
    losses = [r["loss"] for r in result["results"]]
    assert len(set(losses)) == 3, "each adapter must change the loss"
    for row in result["results"]:
        assert row["perplexity"] == pytest.approx(math.exp(row["loss"]), rel=1e-9)
    # Exact match is what scoring the same rows in this process gives, model by model.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.train.data import load_records, prompt_messages, reference_answer
    from lorakit.train.evaluate import score_exact_match

    records = load_records(demo_subset["test"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    model = lorakit.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir),
                                              two_adapters["beta"]).eval()
    expected, _ = score_exact_match(model, tokenizer, [prompt_messages(r) for r in records],
                                    [reference_answer(r) for r in records], max_new_tokens=4)
    assert result["results"][2]["exact_match"] == expected


def test_generate_picks_the_adapter_by_name(tiny_chat_model_dir, two_adapters) -> None:
    common = [
        "generate",
        "Normalize 5 March 2021",
        "--model",
        str(tiny_chat_model_dir),
        "--max-new-tokens",
        "6",
        "--adapter",
        f"alpha={two_adapters['alpha']}",
        "--adapter",
        f"beta={two_adapters['beta']}",
    ]
    answers = {}
    for use in ("base", "alpha", "beta"):
        done = _lorakit(*common, "--use", use)
        assert done.returncode == 0, done.stderr
        answers[use] = done.stdout.strip()
    assert len(set(answers.values())) == 3, answers
    bad = _lorakit(*common, "--use", "gamma")
    assert bad.returncode == 1 and "no adapter of that name" in bad.stderr and "Traceback" not in bad.stderr


def test_chat_switches_adapters_by_name(tiny_chat_model_dir, two_adapters) -> None:
    script = "hello\n/use beta\nhello\n/use nope\n/quit\n"
    done = _lorakit(
        "chat",
        "--model",
        str(tiny_chat_model_dir),
        "--max-new-tokens",
        "5",
        "--adapter",
        f"alpha={two_adapters['alpha']}",
        "--adapter",
        f"beta={two_adapters['beta']}",
        stdin=script,
    )
    assert done.returncode == 0, done.stderr
    assert "[alpha] >" in done.stdout and "[beta] >" in done.stdout
    assert "no adapter 'nope'" in done.stdout


def test_compare_runs_every_variant_on_the_same_budget(tmp_path, tiny_chat_model_dir, demo_subset) -> None:
    done = _lorakit(
        "compare",
        "--model",
        str(tiny_chat_model_dir),
        "--data",
        str(demo_subset["train"]),
        "--validation-data",
        str(demo_subset["validation"]),
        "--test-data",
        str(demo_subset["test"]),
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--only",
        "lora-r4,full",
        "--eval-limit",
        "2",
        "--output",
        str(tmp_path / "cmp"),
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [r["variant"] for r in rows] == ["base", "lora-r4", "full"]
    base, lora, full = rows
    assert base["trainable_params"] == 0 and 0 < lora["trainable_params"] < full["trainable_params"]
    assert all(r["val_loss"] is not None for r in rows)
    assert lora["peak_memory_mb"] > 0 and full["peak_memory_mb"] > 0
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    # The printed table carries each run's figures.
    table_rows = [line for line in done.stdout.splitlines() if "│" in line]
    assert any("lora-r4" in line and f"{lora['trainable_params']:,}" in line for line in table_rows), (
        done.stdout
    )


@pytest.mark.slow
def test_demo_fine_tunes_the_embedded_model_to_80_percent(tmp_path, default_model_dir) -> None:
    """The README's first command, shortened to 40 steps: base ≤ 20 % exact match, LoRA and merged ≥ 80 %."""
    done = _lorakit("demo", "--output", str(tmp_path / "demo"), "--max-steps", "40", timeout=1500)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "demo" / "train" / "report.json").read_text())
    assert report["exact_match_base"] <= 0.2
    assert report["exact_match_adapter"] >= 0.8
    assert re.search(rf"LoRA r=8, 40 steps \({report['trainable_params']:,} trainable params\)", done.stdout)
    merged = re.search(r"merged \(streaming merge\)\s*│\s*(\d+)%", done.stdout)
    assert merged and int(merged.group(1)) >= 80, done.stdout[-1500:]
    merge_report = json.loads((tmp_path / "demo" / "merged" / "merge_report.json").read_text())
    assert merge_report["verification"]["passed"]


def test_cli_reference_is_up_to_date() -> None:
    """docs/cli.md is generated from the commands' help; a changed option without regenerating fails here."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "gen_cli_docs.py"
    done = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
