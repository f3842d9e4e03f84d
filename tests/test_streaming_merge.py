"""Streaming merge (issue 6): `merge_checkpoint` against the in-memory `merge_and_unload`, PEFT 0.21.2,
the unmerged adapter model, and its own verification; sharding, dtypes and support files (peak memory:
test_merge_memory.py).

Every case builds a tiny random model in code, saves it (sharded) as the base, trains nothing but offsets
every adapter tensor by noise, saves the adapter, then merges it both ways.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import (
    clone_model,
    lk_config,
    logits,
    max_diff,
    perturb_adapter,
    quiet,
    seeded,
    tiny_gpt2,
    tiny_llama,
)

import lorakit
from lorakit.errors import AdapterFileError
from lorakit.io.checkpoint import open_checkpoint
from lorakit.merge.adapter_file import open_adapter
from lorakit.merge.plan import build_plan, describe_base
from lorakit.merge.streaming import REPORT_NAME, merge_checkpoint
from lorakit.merge.verify import VerificationError, ulp, verify_checkpoint

TOL = 1e-5


def load(directory: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    with quiet():
        return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()


def adapted(base: torch.nn.Module, seed: int = 7, **config) -> lorakit.PeftModel:
    """A copy of `base` with a non-zero adapter, as after training."""
    with quiet(), seeded(seed):
        model = lorakit.get_peft_model(clone_model(base), lk_config(init_lora_weights=False, **config))
    perturb_adapter(model, seed=seed, scale=0.1)
    return model.eval()


def state_gap(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    return max(max_diff(sa[k], sb[k]) for k in sa)


CASES = {
    "lora": (tiny_llama, dict(target_modules=["q_proj", "v_proj"])),
    "rslora_patterns": (
        tiny_llama,
        dict(
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"],
            lora_alpha=16,
            use_rslora=True,
            rank_pattern={"v_proj": 4, "layers.1.self_attn.q_proj": 2},
            alpha_pattern={"o_proj": 3.0},
        ),
    ),
    "dora": (tiny_llama, dict(target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)),
    "gpt2_conv1d": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
    "gpt2_dora": (tiny_gpt2, dict(target_modules=["c_attn", "c_fc"], use_dora=True, fan_in_fan_out=True)),
    "embedding": (tiny_llama, dict(target_modules=["embed_tokens", "q_proj"])),
    "embedding_dora": (tiny_llama, dict(target_modules=["embed_tokens", "v_proj"], use_dora=True)),
    "modules_to_save": (tiny_llama, dict(target_modules=["q_proj"], modules_to_save=["lm_head"])),
    "bias_all": (tiny_gpt2, dict(target_modules=["c_attn"], bias="all", fan_in_fan_out=True)),
    "lora_bias": (tiny_gpt2, dict(target_modules=["c_attn", "c_fc"], lora_bias=True, fan_in_fan_out=True)),
    "tied_embedding": (tiny_gpt2, dict(target_modules=["wte", "c_attn"], fan_in_fan_out=True)),
    "tied_head_lora": (tiny_gpt2, dict(target_modules=["lm_head", "c_attn"], fan_in_fan_out=True)),
    "tied_modules_to_save": (
        tiny_gpt2,
        dict(target_modules=["c_attn"], modules_to_save=["lm_head"], fan_in_fan_out=True),
    ),
    "olora": (tiny_llama, dict(target_modules=["q_proj", "v_proj"], init_lora_weights="olora")),
    "pissa": (tiny_llama, dict(target_modules=["q_proj", "o_proj"], init_lora_weights="pissa")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_streaming_equals_in_memory_merge(tmp_path: Path, case: str) -> None:
    factory, config = CASES[case]
    base = factory()
    base.save_pretrained(tmp_path / "base", max_shard_size="40KB")
    init = config.pop("init_lora_weights", False)
    with quiet(), seeded(3):
        model = lorakit.get_peft_model(clone_model(base), lk_config(init_lora_weights=init, **config))
    perturb_adapter(model, scale=0.1)
    model.eval().save_pretrained(tmp_path / "adapter")
    unmerged = logits(model)
    in_memory = model.merge_and_unload()

    report = merge_checkpoint(
        tmp_path / "base", tmp_path / "adapter", tmp_path / "out", max_shard_size="64KB"
    )
    merged = load(tmp_path / "out")

    assert state_gap(merged, in_memory) <= TOL
    assert max_diff(logits(merged), logits(in_memory)) <= 1e-4
    assert max_diff(logits(merged), unmerged) <= 1e-4  # the merged model computes what the adapter model did
    # Tied exactly when the in-memory model still shares one tensor (its config may still say tied after
    # modules_to_save replaced the head; the streamed config then says false, which transformers asks for).
    shared = in_memory.get_output_embeddings().weight is in_memory.get_input_embeddings().weight
    assert merged.config.tie_word_embeddings == shared
    assert report.verification is not None and report.verification.passed
    assert report.verification.max_ulp_error <= 1.0
    assert report.tensors_merged + report.tensors_replaced >= 1
    assert report.tensors_merged + report.tensors_replaced + report.tensors_copied == len(
        open_checkpoint(tmp_path / "out").tensors
    )


@pytest.mark.parametrize(
    "case", ["lora", "gpt2_dora", "gpt2_conv1d", "embedding", "dora", "lora_bias", "tied_head_lora"]
)
def test_row_blocks_equal_whole_tensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    """With blocks of a few rows (as for a 128k-token embedding) the result is the in-memory merge."""
    from lorakit.merge import plan

    monkeypatch.setattr(plan, "BLOCK_ELEMENTS", 100)
    factory, config = CASES[case]
    base = factory()
    base.save_pretrained(tmp_path / "base")
    model = adapted(base, **config)
    model.save_pretrained(tmp_path / "adapter")
    in_memory = model.merge_and_unload()
    report = merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    assert report.verification.passed and report.verification.max_ulp_error <= 1.0
    assert state_gap(load(tmp_path / "out"), in_memory) <= TOL


def test_tied_embedding_is_untied_and_written(tmp_path: Path) -> None:
    base = tiny_gpt2()  # ties lm_head to wte; the checkpoint has no lm_head.weight
    base.save_pretrained(tmp_path / "base")
    assert "lm_head.weight" not in open_checkpoint(tmp_path / "base").tensors
    model = adapted(base, target_modules=["wte"])
    model.save_pretrained(tmp_path / "adapter")
    report = merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    out = open_checkpoint(tmp_path / "out")
    assert report.untied_embeddings and report.tensors_added == 1
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    with safe_open(str(tmp_path / "out" / out.tensors["lm_head.weight"].file), "pt") as fh:
        head = fh.get_tensor("lm_head.weight")
    assert torch.equal(head, base.lm_head.weight.detach())  # the head keeps the old embedding
    with safe_open(str(tmp_path / "out" / out.tensors["transformer.wte.weight"].file), "pt") as fh:
        assert max_diff(fh.get_tensor("transformer.wte.weight"), base.transformer.wte.weight) > 0.01


def test_headless_legacy_checkpoint(tmp_path: Path) -> None:
    """The original GPT-2 checkpoints name tensors without the `transformer.` prefix and omit lm_head."""
    base = tiny_gpt2()
    base.save_pretrained(tmp_path / "base")
    legacy = {
        k.removeprefix("transformer."): v.contiguous()
        for k, v in base.state_dict().items()
        if k != "lm_head.weight"
    }
    save_file(legacy, str(tmp_path / "base" / "model.safetensors"), metadata={"format": "pt"})
    model = adapted(base, target_modules=["c_attn", "wte"], fan_in_fan_out=True)
    model.save_pretrained(tmp_path / "adapter")
    merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    assert "h.0.attn.c_attn.weight" in open_checkpoint(tmp_path / "out").tensors
    assert max_diff(logits(load(tmp_path / "out")), logits(model)) <= 1e-4


@pytest.mark.parametrize("case", ["lora", "gpt2_conv1d", "dora"])
def test_matches_peft_merge_and_unload(tmp_path: Path, case: str) -> None:
    import peft

    factory, config = CASES[case]
    base = factory()
    base.save_pretrained(tmp_path / "base")
    adapted(base, **config).save_pretrained(tmp_path / "adapter")
    with quiet():
        oracle = peft.PeftModel.from_pretrained(
            clone_model(base), str(tmp_path / "adapter")
        ).merge_and_unload()
    merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    merged = load(tmp_path / "out")
    assert state_gap(merged, oracle) <= TOL
    assert max_diff(logits(merged), logits(oracle)) <= 1e-4


def _two_adapters(tmp_path: Path, base, first: dict, second: dict) -> list[Path]:
    dirs = [tmp_path / "a", tmp_path / "b"]
    adapted(base, seed=1, **first).save_pretrained(dirs[0])
    adapted(base, seed=2, **second).save_pretrained(dirs[1])
    return dirs


@pytest.mark.parametrize(
    "second", [dict(target_modules=["q_proj", "v_proj"]), dict(target_modules=["v_proj", "o_proj"], r=4)]
)
def test_weighted_adapters_equal_cat_combination(tmp_path: Path, second: dict) -> None:
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    dirs = _two_adapters(tmp_path, base, dict(target_modules=["q_proj", "v_proj"]), second)
    with quiet():
        reference = lorakit.PeftModel.from_pretrained(clone_model(base), dirs[0], adapter_name="a")
        reference.load_adapter(dirs[1], adapter_name="b")
        reference.add_weighted_adapter(["a", "b"], [0.7, 0.3], "mix", combination_type="cat")
    in_memory = reference.merge_and_unload(adapter_names=["mix"])
    report = merge_checkpoint(tmp_path / "base", dirs, tmp_path / "out", weights=[0.7, 0.3])
    assert report.weights == [0.7, 0.3]
    assert state_gap(load(tmp_path / "out"), in_memory) <= TOL


def test_two_dora_adapters_merge_sequentially(tmp_path: Path) -> None:
    """DoRA's norm sees the earlier adapters' updates, as when merging both in memory."""
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    dirs = _two_adapters(tmp_path, base, dict(target_modules=["q_proj", "v_proj"], use_dora=True),
                         dict(target_modules=["v_proj"], use_dora=True, r=4))
    with quiet():
        reference = lorakit.PeftModel.from_pretrained(clone_model(base), dirs[0], adapter_name="a")
        reference.load_adapter(dirs[1], adapter_name="b")
    in_memory = reference.merge_and_unload(adapter_names=["a", "b"])
    merge_checkpoint(tmp_path / "base", dirs, tmp_path / "out")
    assert state_gap(load(tmp_path / "out"), in_memory) <= TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_base_rounds_once_like_in_memory(tmp_path: Path, dtype: torch.dtype) -> None:
    base = tiny_llama(dtype=dtype)
    base.save_pretrained(tmp_path / "base")
    model = adapted(base, target_modules=["q_proj", "v_proj", "embed_tokens"])
    model.save_pretrained(tmp_path / "adapter")
    in_memory = model.merge_and_unload().state_dict()
    report = merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    merged = load(tmp_path / "out", dtype=dtype).state_dict()
    assert report.dtype == str(dtype).removeprefix("torch.")
    for key, value in in_memory.items():
        assert merged[key].dtype == dtype
        gap = (merged[key].double() - value.double()).abs()
        assert bool((gap <= ulp(value, dtype)).all()), key
    changed = (
        merged["model.layers.0.self_attn.q_proj.weight"].float()
        - base.model.layers[0].self_attn.q_proj.weight.detach().float()
    )
    assert float(changed.abs().max()) > 0.01


def test_dtype_conversion_and_config(tmp_path: Path) -> None:
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    model = adapted(base, target_modules=["q_proj"])
    model.save_pretrained(tmp_path / "adapter")
    in_memory = model.merge_and_unload().state_dict()
    merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", dtype="bfloat16")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    merged = load(tmp_path / "out", dtype=torch.bfloat16).state_dict()
    for key, value in in_memory.items():
        assert torch.equal(merged[key], value.to(torch.bfloat16)), key  # float32 result rounded once


def test_sharded_output_index_report_and_support_files(tmp_path: Path) -> None:
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base", max_shard_size="30KB")
    for name, text in {
        "tokenizer.json": "{}",
        "chat_template.jinja": "{{ messages }}",
        "special_tokens_map.json": "{}",
        "pytorch_model.bin": "not copied",
        "notes.gguf": "not copied",
    }.items():
        (tmp_path / "base" / name).write_text(text)
    adapted(base, target_modules=["q_proj", "v_proj"]).save_pretrained(tmp_path / "adapter")
    report = merge_checkpoint(
        tmp_path / "base", tmp_path / "adapter", tmp_path / "out", max_shard_size="20KB"
    )
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert report.shards == len(shards) > 2
    checkpoint = open_checkpoint(out)
    assert (
        set(index["weight_map"]) == set(checkpoint.tensors) == set(open_checkpoint(tmp_path / "base").tensors)
    )
    assert index["metadata"]["total_size"] == checkpoint.total_bytes
    for shard in shards:  # a shard over the limit holds a single tensor
        held = [i for i in checkpoint.tensors.values() if i.file == shard.name]
        assert sum(i.nbytes for i in held) <= 20_000 or len(held) == 1
    for name in (
        "tokenizer.json",
        "chat_template.jinja",
        "special_tokens_map.json",
        "generation_config.json",
    ):
        assert (out / name).read_bytes() == (tmp_path / "base" / name).read_bytes()
    assert not (out / "pytorch_model.bin").exists() and not (out / "notes.gguf").exists()
    saved = json.loads((out / REPORT_NAME).read_text())
    assert saved == json.loads(json.dumps(report.to_dict()))
    assert saved["tensors_merged"] == 4 and saved["verification"]["passed"]
    assert saved["peak_rss_bytes"] > 0 and saved["seconds"] > 0


@pytest.mark.parametrize(
    "first, second, weights, expected",
    [
        (
            dict(target_modules=["q_proj"], use_dora=True),
            dict(target_modules=["v_proj"]),
            [0.5, 1.0],
            "DoRA adapters cannot be weighted",
        ),
        (
            dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
            dict(target_modules=["v_proj"], modules_to_save=["lm_head"]),
            [1.0, 1.0],
            "'lm_head.weight' is also saved",
        ),
    ],
)
def test_conflicting_adapters_are_refused(
    tmp_path: Path, first: dict, second: dict, weights: list, expected: str
) -> None:
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    dirs = _two_adapters(tmp_path, base, first, second)
    with pytest.raises(AdapterFileError, match=expected):
        merge_checkpoint(tmp_path / "base", dirs, tmp_path / "out", weights=weights)
    assert not (tmp_path / "out").exists()


def test_two_adapters_training_biases_are_refused(tmp_path: Path) -> None:
    base = tiny_gpt2()
    base.save_pretrained(tmp_path / "base")
    dirs = _two_adapters(tmp_path, base, dict(target_modules=["c_attn"], bias="all", fan_in_fan_out=True),
                         dict(target_modules=["c_fc"], bias="lora_only", fan_in_fan_out=True))
    with pytest.raises(AdapterFileError, match="only one adapter may carry trained biases"):
        merge_checkpoint(tmp_path / "base", dirs, tmp_path / "out")


def _plan(base_dir: Path, adapter_dir: Path):
    config = json.loads((base_dir / "config.json").read_text())
    checkpoint = open_checkpoint(base_dir)
    return build_plan(checkpoint, describe_base(base_dir, config), [open_adapter(adapter_dir)], [1.0])


def test_verification_detects_corrupted_tensors(tmp_path: Path) -> None:
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    adapted(base, target_modules=["q_proj"]).save_pretrained(tmp_path / "adapter")
    merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", verify=False)
    plan = _plan(tmp_path / "base", tmp_path / "adapter")
    assert verify_checkpoint(tmp_path / "out", plan, None).passed
    # Change one merged and one copied tensor in place, by one float32 step and by one bit.
    file = tmp_path / "out" / "model.safetensors"
    with safe_open(str(file), "pt") as fh:
        tensors = {k: fh.get_tensor(k).clone() for k in fh.keys()}
    q = "model.layers.1.self_attn.q_proj.weight"
    tensors[q][0, 0] = torch.nextafter(tensors[q][0, 0], torch.tensor(float("inf")))
    tensors[q][0, 1] = torch.nextafter(
        torch.nextafter(tensors[q][0, 1], torch.tensor(9.0)), torch.tensor(9.0)
    )
    tensors["model.norm.weight"][3] = torch.nextafter(tensors["model.norm.weight"][3], torch.tensor(9.0))
    save_file(tensors, str(file), metadata={"format": "pt"})
    check = verify_checkpoint(tmp_path / "out", plan, None)
    assert not check.passed
    assert 1.5 <= check.max_ulp_error <= 2.5  # two float32 steps on the merged tensor
    assert any(q in f and "ulp" in f for f in check.failures)
    assert any("model.norm.weight" in f and "bit-identical" in f for f in check.failures)


def test_failed_verification_leaves_no_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lorakit.io import checkpoint

    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    adapted(base, target_modules=["q_proj"]).save_pretrained(tmp_path / "adapter")
    original = checkpoint.ShardedWriter.write

    def faulty(self, name, blocks):  # a writer bug: one tensor off by 1e-3
        original(
            self,
            name,
            [b + 1e-3 for b in blocks] if name.endswith("layers.0.self_attn.q_proj.weight") else blocks,
        )

    monkeypatch.setattr(checkpoint.ShardedWriter, "write", faulty)
    with pytest.raises(VerificationError, match="layers.0.self_attn.q_proj.weight"):
        merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_verify_outputs_reports_logit_agreement(tmp_path: Path) -> None:
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    dirs = _two_adapters(
        tmp_path, base, dict(target_modules=["q_proj", "v_proj"]), dict(target_modules=["o_proj"], r=4)
    )
    report = merge_checkpoint(
        tmp_path / "base", dirs, tmp_path / "out", weights=[0.5, 2.0], verify_outputs=True
    )
    outputs = report.outputs
    assert outputs is not None and outputs.prompts == 3 and outputs.tokens > 10
    assert outputs.max_logit_diff <= 1e-4 and outputs.argmax_agreement == 1.0
    assert abs(outputs.perplexity_delta) <= 1e-3 * outputs.perplexity_reference
    # A base-only comparison would differ: the adapters do change the logits.
    unmerged_gap = max_diff(logits(load(tmp_path / "base")), logits(load(tmp_path / "out")))
    assert unmerged_gap > 1e-2
