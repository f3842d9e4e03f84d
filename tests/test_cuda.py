"""lorakit on a CUDA GPU, against PEFT and against the CPU's float32 numbers (every test is marked `cuda`:
skipped where torch sees no GPU, run by benchmarks/gpu/run.sh).

Needs nothing beyond torch, transformers, accelerate and peft: models are tiny random ones and the chat
tokenizer is built in code (tiny_tokenizer.py). `LORAKIT_TEST_DEVICE=cpu pytest -m cuda tests/test_cuda.py`
runs the same code on the CPU (a dry run of the tests themselves; its comparisons are then CPU with CPU).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from tiny_models import input_ids, make_model, max_diff, perturb_adapter, quiet, seeded
from tiny_tokenizer import tiny_chat_dir

import lorakit
from lorakit import BASE_ROW
from lorakit.layers import LoraLayer
from lorakit.train.config import DPOConfig, TrainConfig
from lorakit.train.dpo import train_dpo
from lorakit.train.precision import Precision
from lorakit.train.sft import train

peft = pytest.importorskip("peft")

pytestmark = [pytest.mark.cuda, pytest.mark.filterwarnings("ignore::UserWarning")]

DEVICE = torch.device(os.environ.get("LORAKIT_TEST_DEVICE", "cuda"))
BF16 = torch.bfloat16
LORA = dict(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = lorakit.get_peft_model(make_model("llama"), lorakit.LoraConfig(**LORA))
    perturb_adapter(model, scale=0.1)
    directory = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(directory)
    return directory


def _load(lib, directory: Path, dtype: torch.dtype = torch.float32, device: torch.device = DEVICE):
    with quiet():
        return lib.PeftModel.from_pretrained(make_model("llama", dtype=dtype), directory).to(device).eval()


@torch.no_grad()
def _logits(model, ids: torch.Tensor, dtype: torch.dtype = torch.float32, **kwargs) -> torch.Tensor:
    device = next(model.parameters()).device
    with Precision(device, dtype).autocast():
        return model(input_ids=ids.to(device), **kwargs).logits.float().cpu()


# ---- PEFT parity, fp32 and bf16 ------------------------------------------------------------------------


def test_fp32_logits_equal_peft_and_the_cpu(saved_adapter: Path) -> None:
    ids = input_ids(4, 16)
    ours, theirs = _logits(_load(lorakit, saved_adapter), ids), _logits(_load(peft, saved_adapter), ids)
    cpu = _logits(_load(lorakit, saved_adapter, device=torch.device("cpu")), ids)
    assert max_diff(ours, theirs) <= 1e-5
    assert max_diff(ours, cpu) <= 1e-4  # other kernels, other summation orders


def test_bf16_logits_match_peft_under_autocast(saved_adapter: Path) -> None:
    ids = input_ids(4, 16)
    ours, theirs = _load(lorakit, saved_adapter, BF16), _load(peft, saved_adapter, BF16)
    assert {p.dtype for n, p in ours.named_parameters() if "lora_" in n} == {torch.float32}
    with quiet():  # the same bf16-rounded base weights in float32
        reference = lorakit.PeftModel.from_pretrained(make_model("llama", dtype=BF16).float(), saved_adapter)
    expected = _logits(reference.to(DEVICE), ids)
    ours_logits, theirs_logits = _logits(ours, ids, BF16), _logits(theirs, ids, BF16)
    assert max_diff(ours_logits, theirs_logits) <= 0.03  # a few bf16 ulps (CPU: 0.0156)
    assert max_diff(ours_logits, expected) <= max(2 * max_diff(theirs_logits, expected), 1e-3)


# ---- merge / unmerge -----------------------------------------------------------------------------------


def test_merge_into_bf16_rounds_once_and_unmerge_restores_fp32(saved_adapter: Path) -> None:
    model = _load(lorakit, saved_adapter, BF16)
    expected = {
        name: (m.base_layer.weight.float() + m.delta_weight("default").float()).to(BF16)
        for name, m in model.named_modules()
        if isinstance(m, LoraLayer) and hasattr(m, "lora_A")
    }
    merged = model.merge_and_unload()
    for name, weight in expected.items():
        assert torch.equal(merged.get_submodule(name.removeprefix("base_model.model.")).weight, weight), name
    full = _load(lorakit, saved_adapter)
    ids = input_ids(2, 12)
    before = {n: p.detach().clone() for n, p in full.named_parameters()}
    unmerged = _logits(full, ids)
    full.merge_adapter()
    assert max_diff(_logits(full, ids), unmerged) <= 1e-4
    full.unmerge_adapter()
    assert max(max_diff(p, before[n]) for n, p in full.named_parameters()) <= 1e-6


# ---- mixed-adapter rows --------------------------------------------------------------------------------


def test_mixed_adapter_rows_equal_single_adapter_runs_and_peft() -> None:
    names = ["a0", "a1", "a2"]
    with seeded(0):
        ours = lorakit.get_peft_model(
            make_model("llama"), lorakit.LoraConfig(r=4, target_modules="all-linear"), adapter_name="a0"
        )
        ours.add_adapter("a1", lorakit.LoraConfig(r=8, lora_alpha=32, target_modules="all-linear"))
        ours.add_adapter("a2", lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    for i, name in enumerate(names):
        ours.set_adapter(name)
        perturb_adapter(ours, seed=10 + i)
    with seeded(0), quiet():
        theirs = peft.get_peft_model(
            make_model("llama"), peft.LoraConfig(r=4, target_modules="all-linear"), adapter_name="a0"
        )
        theirs.add_adapter("a1", peft.LoraConfig(r=8, lora_alpha=32, target_modules="all-linear"))
        theirs.add_adapter("a2", peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    theirs.load_state_dict(ours.state_dict())
    ours, theirs = ours.to(DEVICE).eval(), theirs.to(DEVICE).eval()
    rows = ["a1", BASE_ROW, "a0", "a2", "a1", "a0"]
    ids = input_ids(len(rows), 10)
    mixed = _logits(ours, ids, adapter_names=rows)
    assert max_diff(mixed, _logits(theirs, ids, adapter_names=rows)) <= 1e-5
    for i, name in enumerate(rows):
        if name == BASE_ROW:
            with ours.disable_adapter():
                alone = _logits(ours, ids[i : i + 1])
        else:
            ours.set_adapter(name)
            alone = _logits(ours, ids[i : i + 1])
        assert max_diff(mixed[i : i + 1], alone) <= 1e-5, name


# ---- training steps against the CPU --------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_chat_dir(tmp_path_factory.mktemp("chat-model"))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lorakit.train.preference_data import bundled_preference_path

    path = tmp_path_factory.mktemp("pairs") / "train.jsonl"
    path.write_text("\n".join(bundled_preference_path("train").read_text().splitlines()[:24]) + "\n")
    return path


def _losses(output: Path) -> list[float]:
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def _sft(tmp: Path, model: Path, data: Path, device: str, dtype: str, **extra) -> list[float]:
    output = tmp / f"sft-{len(list(tmp.iterdir()))}"
    train(
        TrainConfig.from_options(
            dict(
                model=str(model),
                data=str(data),
                output=str(output),
                max_steps=4,
                eval_every=100,
                batch_size=4,
                learning_rate=5e-3,
                warmup_steps=0,
                seed=3,
                device=device,
                dtype=dtype,
                **extra,
            )
        )
    )
    return _losses(output)


def _close(losses: list[float], reference: list[float], relative: float) -> bool:
    return len(losses) == len(reference) and all(
        abs(a - b) <= relative * abs(b) for a, b in zip(losses, reference)
    )


def test_sft_steps_match_the_cpu_in_fp32_and_follow_it_in_bf16(tmp_path, chat_dir, demo_subset) -> None:
    cpu = _sft(tmp_path, chat_dir, demo_subset["train"], "cpu", "fp32")
    assert _close(_sft(tmp_path, chat_dir, demo_subset["train"], str(DEVICE), "fp32"), cpu, 1e-4)
    bf16 = _sft(tmp_path, chat_dir, demo_subset["train"], str(DEVICE), "bf16")
    assert _close(bf16, cpu, 1e-2), (bf16, cpu)  # CPU bf16: 3e-5 (tests/test_precision.py)
    fp16 = _sft(tmp_path, chat_dir, demo_subset["train"], str(DEVICE), "fp16")
    assert _close(fp16, cpu, 1e-2), (fp16, cpu)


def test_dpo_steps_match_the_cpu(tmp_path, chat_dir, pairs) -> None:
    def run(device: str, dtype: str) -> list[float]:
        output = tmp_path / f"dpo-{len(list(tmp_path.iterdir()))}"
        train_dpo(
            DPOConfig.from_options(
                dict(
                    model=str(chat_dir),
                    data=str(pairs),
                    output=str(output),
                    max_steps=3,
                    eval_every=100,
                    batch_size=4,
                    learning_rate=5e-3,
                    warmup_steps=0,
                    seed=3,
                    device=device,
                    dtype=dtype,
                )
            )
        )
        return _losses(output)

    cpu = run("cpu", "fp32")
    assert _close(run(str(DEVICE), "fp32"), cpu, 1e-4)
    assert _close(run(str(DEVICE), "bf16"), cpu, 2e-2)


@pytest.fixture(scope="module")
def bf16_losses(tmp_path_factory: pytest.TempPathFactory, chat_dir, demo_subset) -> list[float]:
    """The 4 SFT losses of the plain bf16 model on the device, which the variants below are compared with."""
    return _sft(tmp_path_factory.mktemp("bf16-sft"), chat_dir, demo_subset["train"], str(DEVICE), "bf16")


def test_liger_kernels_train_like_the_plain_model(tmp_path, chat_dir, demo_subset, bf16_losses) -> None:
    pytest.importorskip("liger_kernel")
    liger = _sft(tmp_path, chat_dir, demo_subset["train"], str(DEVICE), "bf16", liger=True)
    assert _close(liger, bf16_losses, 1e-2), (liger, bf16_losses)


# ---- 8-bit and 4-bit bases -----------------------------------------------------------------------------


@pytest.mark.parametrize("bits", ["load_in_8bit", "load_in_4bit"])
def test_quantized_base_trains_on_the_gpu(tmp_path, chat_dir, demo_subset, bf16_losses, bits: str) -> None:
    pytest.importorskip("bitsandbytes")
    losses = _sft(tmp_path, chat_dir, demo_subset["train"], str(DEVICE), "bf16", **{bits: True})
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    # Quantizing the base's weights moves the loss a little, not the training.
    assert _close(losses, bf16_losses, 5e-2), (losses, bf16_losses)
