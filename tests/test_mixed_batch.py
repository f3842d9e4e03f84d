"""Mixed-adapter batches through the batched (stacked-factor) path of `lorakit.layers.mixed`: every row
equals a run with its adapter alone and PEFT's `adapter_names` output, for mixes of ranks, layer kinds,
base rows and generate's row expansion (beams); the stacks are cached and rebuilt when factors change."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import pytest
import torch
from tiny_models import input_ids, logits, make_model, max_diff, perturb_adapter, quiet, seeded

from lorakit import BASE_ROW, LoraConfig, get_peft_model
from lorakit.layers import LoraEmbedding, LoraLinear, mixed, row_adapters

GPT2 = {"fan_in_fan_out": True}

# (model kind, one LoraConfig per adapter): ranks differ within each mix, targets overlap only partly.
MIXES = {
    "llama-ranks-1-4-8-embed": (
        "llama",
        [
            dict(r=1, target_modules=["q_proj", "v_proj", "embed_tokens"]),
            dict(r=4, lora_alpha=16, target_modules=["v_proj", "o_proj", "embed_tokens"]),
            dict(r=8, target_modules=["q_proj", "down_proj"], use_rslora=True),
        ],
    ),
    "gpt2-conv1d-ranks-2-16-bias": (
        "gpt2",
        [
            dict(r=2, target_modules=["c_attn", "c_proj"], **GPT2),
            dict(r=16, lora_alpha=4, target_modules=["c_attn"], lora_bias=True, **GPT2),
            dict(r=5, target_modules=["c_fc", "wte"], **GPT2),
        ],
    ),
    "mistral-all-linear-4x": (
        "mistral",
        [dict(r=r, lora_alpha=2 * r, target_modules="all-linear") for r in (8, 3, 8, 5)],
    ),
}
ROWS = {
    "llama-ranks-1-4-8-embed": ["a0", BASE_ROW, "a2", "a1", "a0", "a2"],
    "gpt2-conv1d-ranks-2-16-bias": ["a1", "a2", BASE_ROW, "a0", "a1"],
    "mistral-all-linear-4x": ["a3", "a2", "a1", "a0", BASE_ROW, "a2"],
}


def _adapters(kind: str, configs: list[dict]):
    """Our PeftModel with adapters a0, a1, ... (perturbed so that each differs from the base)."""
    with seeded(0):
        model = get_peft_model(make_model(kind), LoraConfig(**configs[0]), adapter_name="a0")
        for i, config in enumerate(configs[1:], start=1):
            model.add_adapter(f"a{i}", LoraConfig(**config))
    for i in range(len(configs)):
        model.set_adapter(f"a{i}")
        perturb_adapter(model, seed=10 + i)
    return model.eval()


def _peft_copy(kind: str, configs: list[dict], ours):
    peft = pytest.importorskip("peft")
    with seeded(0), quiet():
        theirs = peft.get_peft_model(make_model(kind), peft.LoraConfig(**configs[0]), adapter_name="a0")
        for i, config in enumerate(configs[1:], start=1):
            theirs.add_adapter(f"a{i}", peft.LoraConfig(**config))
    theirs.load_state_dict(ours.state_dict())
    return theirs.eval()


def _single_runs(model, names: set[str], fn):
    out = {}
    for name in names - {BASE_ROW}:
        model.set_adapter(name)
        out[name] = fn()
    with model.disable_adapter():
        out[BASE_ROW] = fn()
    return out


@pytest.mark.parametrize("mix", list(MIXES))
def test_mixed_rows_equal_single_adapter_runs(mix: str) -> None:
    kind, configs = MIXES[mix]
    rows = ROWS[mix]
    model = _adapters(kind, configs)
    ids = input_ids(len(rows), 7)
    single = _single_runs(model, set(rows), lambda: logits(model, ids))
    mixed_out = logits(model, ids, adapter_names=rows)
    for (
        layer
    ) in model.modules():  # plain LoRA rows all take the stacked path: every layer stacked its adapters
        if isinstance(layer, (LoraLinear, LoraEmbedding)):
            assert layer.row_stack.stack.names == tuple(sorted(set(rows) & set(layer.r))), layer.module_name
    for i, name in enumerate(rows):
        assert max_diff(single[name][i], single[BASE_ROW][i]) > 1e-3 or name == BASE_ROW, (i, name)
        assert max_diff(mixed_out[i], single[name][i]) <= 1e-4, (i, name)


@pytest.mark.parametrize("mix", list(MIXES))
def test_mixed_rows_match_peft(mix: str) -> None:
    kind, configs = MIXES[mix]
    rows = ROWS[mix]
    ours = _adapters(kind, configs)
    theirs = _peft_copy(kind, configs, ours)
    ids = input_ids(len(rows), 7)
    assert max_diff(logits(ours, ids, adapter_names=rows), logits(theirs, ids, adapter_names=rows)) <= 1e-4


@pytest.mark.parametrize("mix", ["llama-ranks-1-4-8-embed", "gpt2-conv1d-ranks-2-16-bias"])
def test_generate_with_beams_expands_rows(mix: str) -> None:
    """num_beams/num_return_sequences repeat each row; each copy keeps its row's adapter."""
    kind, configs = MIXES[mix]
    rows = ROWS[mix][:4]
    ours = _adapters(kind, configs)
    ids = input_ids(len(rows), 5)
    settings = dict(max_new_tokens=4, do_sample=False, num_beams=3, num_return_sequences=2, pad_token_id=0)
    with torch.no_grad():
        mixed_out = ours.generate(input_ids=ids, adapter_names=rows, **settings)
        single = _single_runs(ours, set(rows), lambda: ours.generate(input_ids=ids, **settings))
    assert mixed_out.shape[0] == 2 * len(rows)
    for i, name in enumerate(rows):
        assert torch.equal(mixed_out[2 * i:2 * i + 2], single[name][2 * i:2 * i + 2]), (i, name)
    theirs = _peft_copy(kind, configs, ours)
    with torch.no_grad(), quiet():
        assert torch.equal(mixed_out, theirs.generate(input_ids=ids, adapter_names=rows, **settings))


def test_dora_rows_keep_the_per_adapter_path_in_a_mixed_batch() -> None:
    configs = [dict(r=4, target_modules=["q_proj", "v_proj"]),
               dict(r=2, target_modules=["v_proj", "embed_tokens"], use_dora=True),
               dict(r=6, target_modules=["q_proj", "v_proj", "embed_tokens"])]
    model = _adapters("llama", configs)
    rows = ["a1", "a0", BASE_ROW, "a2", "a1"]
    ids = input_ids(len(rows), 6)
    single = _single_runs(model, set(rows), lambda: logits(model, ids))
    mixed_out = logits(model, ids, adapter_names=rows)
    for i, name in enumerate(rows):
        assert max_diff(mixed_out[i], single[name][i]) <= 1e-4, (i, name)
    # (PEFT 0.21 refuses adapter_names with DoRA, so per-adapter runs are the only reference here.)


def test_stacks_are_cached_and_rebuilt_when_adapters_change(tmp_path: Path) -> None:
    kind, configs = MIXES["llama-ranks-1-4-8-embed"]
    model = _adapters(kind, configs)
    rows = ROWS["llama-ranks-1-4-8-embed"]
    ids = input_ids(len(rows), 5)
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    logits(model, ids, adapter_names=rows)
    first = layer.row_stack.stack
    logits(model, ids, adapter_names=rows)
    assert layer.row_stack.stack is first, "the same adapters should reuse the stacked factors"

    def check() -> None:
        single = _single_runs(model, set(rows), lambda: logits(model, ids))
        out = logits(model, ids, adapter_names=rows)
        for i, name in enumerate(rows):
            assert max_diff(out[i], single[name][i]) <= 1e-4, (i, name)

    model.set_adapter("a1")
    perturb_adapter(model, seed=99)  # in-place change of a1's factors (as an optimizer step would)
    check()
    assert layer.row_stack.stack is not first

    # Delete a0 and load a different adapter under the same name: the stale stack must not be used.
    other = _adapters(kind, configs)
    other.set_adapter("a2")
    perturb_adapter(other, seed=123)
    other.save_pretrained(tmp_path, selected_adapters=["a2"])
    model.delete_adapter("a0")
    model.load_adapter(tmp_path / "a2", adapter_name="a0")
    model.eval()
    check()


def test_freshness_is_checked_once_per_call_not_at_every_decoding_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kind, configs = MIXES["mistral-all-linear-4x"]
    model = _adapters(kind, configs)
    rows = ROWS["mistral-all-linear-4x"]
    looked_up: list[str] = []
    real = mixed._factor_tensors

    def spy(layer, name):
        looked_up.append(name)
        return real(layer, name)

    monkeypatch.setattr(mixed, "_factor_tensors", spy)
    per_check = 4 * sum(isinstance(m, LoraLinear) for m in model.modules())  # every layer carries a0..a3
    settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        first = model.generate(input_ids=input_ids(len(rows), 5), adapter_names=rows, **settings)
        assert len(looked_up) == per_check, "six forward passes, one check per layer"
        model.set_adapter("a2")
        perturb_adapter(model, seed=7)
        second = model.generate(input_ids=input_ids(len(rows), 5), adapter_names=rows, **settings)
    assert len(looked_up) == 2 * per_check, "the next call checks again"
    changed = [i for i, name in enumerate(rows) if not torch.equal(first[i], second[i])]
    assert changed and all(rows[i] == "a2" for i in changed), "the next call sees the changed adapter"


def test_grad_and_train_mode_changes_inside_one_call_are_checked() -> None:
    configs = [
        dict(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.5),
        dict(r=2, target_modules=["v_proj"]),
    ]
    model = _adapters("llama", configs)
    model.set_requires_grad(["a0", "a1"], True)
    ids = input_ids(3, 5)
    with row_adapters(["a0", "a1", BASE_ROW]):
        with torch.no_grad():
            before = model(input_ids=ids).logits  # stacks the factors as detached copies
            model.train()
            dropped = [model(input_ids=ids).logits for _ in range(2)]
        assert max_diff(dropped[0][0], dropped[1][0]) > 1e-4, "train mode: a0's dropout applies"
        model.eval()
        model(input_ids=ids).logits.pow(2).mean().backward()
        for name in ("a0", "a1"):
            grads = [p.grad for n, p in model.named_parameters() if f".{name}." in n]
            assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), name
        with torch.no_grad():
            for param in model.parameters():
                if param.grad is not None:
                    param.sub_(param.grad)  # an optimizer step between two no-grad passes of the block
            stepped = model(input_ids=ids).logits
    with torch.no_grad():
        assert max_diff(stepped, model(input_ids=ids, adapter_names=["a0", "a1", BASE_ROW]).logits) < 1e-6
        assert max_diff(stepped, before) > 1e-3, "the step changed the output"


def test_training_with_gradients_falls_back_and_trains_each_row_adapter() -> None:
    """In training mode `adapter_names=` is refused as in PEFT; a `row_adapters` block trains each row's
    adapter."""
    configs = [dict(r=4, target_modules=["q_proj", "v_proj"]), dict(r=2, target_modules=["v_proj"])]
    model = _adapters("llama", configs)
    model.train()
    model.set_requires_grad(["a0", "a1"], True)
    rows = ["a0", "a1", BASE_ROW]
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when the model is in training mode"):
        model(input_ids=input_ids(3, 5), adapter_names=rows)
    with row_adapters(rows):
        out = model(input_ids=input_ids(3, 5)).logits
    out.float().pow(2).mean().backward()
    for name in ("a0", "a1"):
        grads = [p.grad for n, p in model.named_parameters() if f".{name}." in n]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), name


def test_two_threads_in_two_blocks_each_compute_their_own_rows() -> None:
    """Row state is per thread: blocks open at the same time in two threads, and a third thread outside any
    block, each get their own answer, while the layers' stacks are swapped between adapter sets underneath."""
    kind, configs = MIXES["llama-ranks-1-4-8-embed"]
    model = _adapters(kind, configs)
    ids = input_ids(3, 6)
    plans = {"first": ["a0", "a1", BASE_ROW], "second": ["a2", BASE_ROW, "a0"], "outside": None}
    expected = {key: logits(model, ids, adapter_names=rows) for key, rows in plans.items()}
    assert max_diff(expected["first"], expected["second"]) > 1e-3
    barrier = threading.Barrier(len(plans))
    results: dict[str, list[torch.Tensor]] = {}

    def run(key: str) -> None:
        rows = plans[key]
        with torch.no_grad(), row_adapters(rows) if rows else contextlib.nullcontext():
            barrier.wait()  # every thread is inside its block (or outside any) before the first forward
            results[key] = [model(input_ids=ids).logits for _ in range(6)]

    threads = [threading.Thread(target=run, args=(key,)) for key in plans]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    for key, outs in results.items():
        assert all(max_diff(out, expected[key]) <= 1e-6 for out in outs), key
    assert set(results) == set(plans)
