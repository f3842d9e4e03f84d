"""GGUF export (issue 22), checked through implementations lorakit did not write: transformers' GGUF loader
(config, tokenizer, dequantization) and the `gguf` package's reader; llama.cpp itself in a slow test.

Tolerances, max |Δlogit| against the float32 merged safetensors checkpoint (both computed in float32 by
transformers): f32 stores the merged weights exactly, so ≤ 1e-5 (summation order); f16 rounds each
matrix once (relative error ≤ 2⁻¹¹; norms stay f32), ≤ 1e-2 on these models, whose logits are O(1), and
equals that merged model with its matrices rounded to f16 to ≤ 1e-5. Greedy tokens are compared with the
merged model of the same precision: random tiny models have near-ties that any rounding may flip (the
embedded model's date task in the slow test compares f16 with the float32 merge).
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import torch
from gguf_models import (
    CASES,
    build_family,
    bundled_prompts,
    dequantized,
    gguf_fields,
    greedy,
    load_dir,
    load_gguf,
    make_base,
    prompt_logits,
    round_matrices,
    save_adapter,
)
from tiny_models import quiet, tiny_gpt2

from lorakit.cli.main import main
from lorakit.errors import AdapterFileError, LorakitError
from lorakit.export import export_adapter_gguf, export_gguf
from lorakit.merge.streaming import merge_checkpoint

# max |Δlogit| against the float32 merge (see the module docstring)
TOLERANCE = {"f32": 1e-5, "f16": 1e-2}


@pytest.fixture(scope="module", params=list(CASES))
def family(request, tmp_path_factory, default_model_dir) -> dict:
    return build_family(request.param, tmp_path_factory.mktemp(f"gguf-{request.param}"), default_model_dir)


@pytest.mark.parametrize("kind", ["f32", "f16"])
def test_transformers_loads_the_export_and_matches_the_merged_model(family, kind) -> None:
    root, prompts = family["root"], family["prompts"]
    path = root / f"model-{kind}.gguf"
    report = export_gguf(root / "base", path, [root / "adapter"], type=kind)
    assert report.tensors == (20 if family["tied"] else 21) + (6 if family["name"] == "qwen2" else 0)
    exported, merged = load_gguf(path), load_dir(root / "merged")
    got = prompt_logits(exported, prompts)
    assert (got - prompt_logits(merged, prompts)).abs().max().item() <= TOLERANCE[kind]
    if kind == "f16":
        round_matrices(merged, torch.float16)
        assert (got - prompt_logits(merged, prompts)).abs().max().item() <= 1e-5
    assert [greedy(exported, ids) for ids in prompts] == [greedy(merged, ids) for ids in prompts]


def test_q8_0_stays_close_to_the_merged_model(family) -> None:
    root, prompts = family["root"], family["prompts"]
    path = root / "model-q8_0.gguf"
    report = export_gguf(root / "base", path, [root / "adapter"], type="q8_0")
    assert set(report.types) == {"q8_0", "f32"}
    got = prompt_logits(load_gguf(path), prompts)
    expected = prompt_logits(load_dir(root / "merged"), prompts)
    assert (got - expected).abs().max().item() <= 0.1
    agreement = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
    # random tiny models have near-ties; the embedded model's ≥ 99 % is in the slow date-task test
    assert agreement >= 0.8


def converter_row_order(weights: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute): q/k rows of each head from rotate-half
    halves to interleaved pairs."""
    shape = weights.shape
    return weights.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


@pytest.mark.parametrize("family", ["llama", "qwen2"], indirect=True)
def test_q8_0_is_what_llama_cpps_converter_writes(family, tmp_path) -> None:
    """As `convert_hf_to_gguf.py --outtype q8_0`: every matrix q8_0, token_embd and output included (the
    converter keeps them f16 only for ternary types), vectors f32; the bytes are the `gguf` package's
    quantizer applied once to the float32 merge (q/k rows of `llama` models in the converter's order)."""
    from safetensors.torch import load_file

    root = family["root"]
    export_gguf(root / "merged", tmp_path / "m.gguf", type="q8_0")
    config = json.loads((root / "merged" / "config.json").read_text())
    arch = gguf.MODEL_ARCH.QWEN2 if family["name"] == "qwen2" else gguf.MODEL_ARCH.LLAMA
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    stored = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    merged = {}
    for path in sorted((root / "merged").glob("*.safetensors")):
        merged.update(load_file(path))
    if family["tied"]:
        merged.pop("lm_head.weight", None)
    assert set(stored) == {names.get_name(n, try_suffixes=(".weight", ".bias")) for n in merged}
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    for name, weight in merged.items():
        assert weight.dtype == torch.float32, name
        tensor = stored[names.get_name(name, try_suffixes=(".weight", ".bias"))]
        kind = tensor.name.split(".")[-2]
        if arch == gguf.MODEL_ARCH.LLAMA and kind in heads and tensor.name.endswith(".weight"):
            weight = converter_row_order(weight, heads[kind])
        if weight.dim() == 1:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32, tensor.name
            expected = weight.numpy()
        else:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0, tensor.name
            expected = gguf.quants.quantize(weight.contiguous().numpy(), gguf.GGMLQuantizationType.Q8_0)
        assert tensor.data.tobytes() == expected.tobytes(), tensor.name


def test_tokenizer_metadata_round_trips(family) -> None:
    """transformers rebuilds the tokenizer from the GGUF metadata alone: same ids, specials, chat template."""
    from transformers import AutoTokenizer

    root, tok = family["root"], family["tokenizer"]
    path = root / "tokenizer-check.gguf"
    export_gguf(root / "base", path, type="f32")
    fields = gguf_fields(path)["fields"]
    assert fields["tokenizer.ggml.model"] == "gpt2"
    expected_pre = {"llama": "llama-bpe", "mistral": "gpt-2", "qwen2": "qwen2", "smollm2": "gpt-2"}
    assert fields["tokenizer.ggml.pre"] == expected_pre[family["name"]]
    assert fields["tokenizer.ggml.tokens"] == len(tok) + family["extra"]
    assert fields["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert fields["tokenizer.ggml.add_bos_token"] is False
    with quiet():
        rebuilt = AutoTokenizer.from_pretrained(root, gguf_file=path.name)
    texts = bundled_prompts(tok) + ["Hello  world,\n 2021-03-05 isn't 12345 <|im_end|>"]
    assert [rebuilt(t)["input_ids"] for t in texts] == [tok(t)["input_ids"] for t in texts]
    assert rebuilt.chat_template == tok.chat_template
    assert (rebuilt.eos_token, rebuilt.bos_token) == (tok.eos_token, tok.bos_token)


def test_export_of_a_merged_checkpoint_equals_the_direct_export(family, tmp_path) -> None:
    root = family["root"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    export_gguf(root / "base", tmp_path / "a" / "m.gguf", [root / "adapter"], type="q8_0")
    export_gguf(root / "merged", tmp_path / "b" / "m.gguf", type="q8_0")
    assert (tmp_path / "a" / "m.gguf").read_bytes() == (tmp_path / "b" / "m.gguf").read_bytes()


def llama_cpp_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, alpha: float,
                    embedding: bool) -> torch.Tensor:
    """The update llama.cpp adds (src/llama-graph.cpp): (alpha / r) · B A with r = B's columns; for
    token_embd it looks up rows of lora_a (vocab, r), so the update of row t is (alpha / r) · lora_a[t] Bᵀ."""
    scale = alpha / lora_b.shape[1] if alpha else 1.0
    return scale * (lora_a @ lora_b.T if embedding else lora_b @ lora_a)


def test_adapter_export_reproduces_the_merge_under_llama_cpp_maths(tmp_path, default_model_dir) -> None:
    """rsLoRA, a per-module alpha and rank, and an embedding adapter: llama.cpp's formula applied to the
    GGUF base and the GGUF adapter gives the merged model's weights (all in GGUF's row order)."""
    base = make_base(tmp_path / "base", "llama", "llama-bpe", tied=False)
    save_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, use_rslora=True, rank_pattern={"k_proj": 2},
                 alpha_pattern={"v_proj": 3}, target_modules=["q_proj", "k_proj", "v_proj", "embed_tokens"])
    report = export_adapter_gguf(tmp_path / "base", tmp_path / "adapter", tmp_path / "a.gguf", type="f32")
    assert report.kind == "adapter" and report.tensors == 2 * 7
    meta = gguf_fields(tmp_path / "a.gguf")["fields"]
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["general.architecture"] == "llama" and meta["adapter.lora.alpha"] == 8.0
    export_gguf(tmp_path / "base", tmp_path / "base.gguf", type="f32")
    merge_checkpoint(tmp_path / "base", [tmp_path / "adapter"], tmp_path / "merged", verify=False)
    export_gguf(tmp_path / "merged", tmp_path / "merged.gguf", type="f32")
    weights, lora, merged = (dequantized(tmp_path / f) for f in ("base.gguf", "a.gguf", "merged.gguf"))
    adapted = {name.removesuffix(".lora_a") for name in lora if name.endswith(".lora_a")}
    assert "token_embd.weight" in adapted and "blk.1.attn_k.weight" in adapted
    for name, expected in merged.items():
        got = weights[name]
        if name in adapted:
            a, b = lora[f"{name}.lora_a"], lora[f"{name}.lora_b"]
            got = got + llama_cpp_delta(a, b, 8.0, name == "token_embd.weight")
        assert torch.allclose(got, expected, atol=1e-6, rtol=0), name


@pytest.mark.parametrize("family", ["llama"], indirect=True)
@pytest.mark.parametrize("qtype", ["bf16", "q5_1", "q5_0", "q4_1", "q4_0"])
def test_other_types_load_and_stay_near_the_merge(family, qtype) -> None:
    """Cheap extra types: transformers loads them; weights within the type's rounding of the merge."""
    root = family["root"]
    path = root / f"model-{qtype}.gguf"
    export_gguf(root / "base", path, [root / "adapter"], type=qtype)
    stored = dequantized(path)
    merged = dequantized(root / "model-f32.gguf") if (root / "model-f32.gguf").exists() else None
    if merged is None:
        export_gguf(root / "base", root / "model-f32.gguf", [root / "adapter"], type="f32")
        merged = dequantized(root / "model-f32.gguf")
    # one step of a 4-bit code is a 1/8 (q4_0: 1/7.5) of the block's largest magnitude
    bound = {"bf16": 2**-8, "q5_1": 1 / 31, "q5_0": 1 / 15, "q4_1": 1 / 15, "q4_0": 1 / 8}[qtype]
    for name, expected in merged.items():
        if expected.dim() == 2:
            scale = expected.abs().max().item()
            assert (stored[name] - expected).abs().max().item() <= bound * scale, name
    load_gguf(path)


# ---- bad input: one line, nothing written -----------------------------------------------------------------


def run(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exit_info.value.code or 0, captured.out, captured.err


@pytest.fixture
def llama_dir(tmp_path) -> Path:
    base = make_base(tmp_path / "base", "llama", "gpt-2", tied=False)
    save_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8)
    return tmp_path


def only_error_line(err: str, *needles: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert all(n in lines[0] for n in needles), lines[0]


def test_cli_writes_a_model_and_an_adapter_and_reports_them(llama_dir, capsys) -> None:
    code, out, _ = run(capsys, "export", "--format", "gguf", "--model", llama_dir / "base", "--adapter",
                       llama_dir / "adapter", "-o", llama_dir / "m.gguf", "--type", "q8_0")
    assert code == 0 and "q8_0" in out and "tensors" in out and "kB" in out
    fields = gguf_fields(llama_dir / "m.gguf")["fields"]
    assert fields["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    code, out, _ = run(capsys, "export", "--model", llama_dir / "base", "--adapter", llama_dir / "adapter",
                       "--adapter-only", "-o", llama_dir / "a.gguf")
    assert code == 0 and "GGUF LoRA adapter" in out
    tensors = gguf_fields(llama_dir / "a.gguf")["tensors"]
    assert tensors["blk.0.attn_q.weight.lora_a"] == ("F16", (4, 32))
    assert tensors["blk.0.attn_q.weight.lora_b"] == ("F16", (32, 4))


def test_unsupported_architecture_is_refused(tmp_path, capsys) -> None:
    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    code, _, err = run(capsys, "export", "--model", tmp_path / "gpt2", "-o", tmp_path / "x.gguf")
    assert code == 1
    only_error_line(err, "'gpt2'", "GPT2LMHeadModel", "llama, mistral, qwen2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2"]


@pytest.mark.parametrize("adapter_only", [False, True])
def test_adapter_for_another_base_is_refused(llama_dir, tmp_path, capsys, adapter_only) -> None:
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(llama_dir / "base")
    config.hidden_size, config.head_dim = 64, 16
    save_adapter(LlamaForCausalLM(config), tmp_path / "wide-adapter", r=4, lora_alpha=8)
    args = ["export", "--model", llama_dir / "base", "--adapter", tmp_path / "wide-adapter",
            "-o", tmp_path / "x.gguf"]
    code, _, err = run(capsys, *args, *(["--adapter-only"] if adapter_only else []))
    assert code == 1
    only_error_line(err, "adapter_model.safetensors", "another base model")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".x.gguf*"))


def test_existing_output_needs_overwrite_and_a_failed_export_leaves_it_whole(llama_dir, capsys,
                                                                             monkeypatch) -> None:
    out = llama_dir / "m.gguf"
    out.write_bytes(b"previous")
    code, _, err = run(capsys, "export", "--model", llama_dir / "base", "-o", out)
    assert code == 1 and out.read_bytes() == b"previous"
    only_error_line(err, "m.gguf", "already exists", "--overwrite")

    import lorakit.export.model as model_module

    calls = 0
    real = model_module.encode

    def failing(rows, qtype):
        nonlocal calls
        calls += 1
        if calls == 5:
            raise OSError(28, "No space left on device", str(out))
        return real(rows, qtype)

    monkeypatch.setattr(model_module, "encode", failing)
    code, _, err = run(capsys, "export", "--model", llama_dir / "base", "-o", out, "--overwrite")
    assert code == 1 and out.read_bytes() == b"previous" and calls == 5
    assert sorted(p.name for p in llama_dir.iterdir() if p.name.startswith(".")) == []
    monkeypatch.undo()
    code, _, _ = run(capsys, "export", "--model", llama_dir / "base", "-o", out, "--overwrite")
    assert code == 0 and out.read_bytes()[:4] == b"GGUF"


@pytest.mark.parametrize("family_name, config, needle", [
    ("llama", {"use_dora": True}, "DoRA"),
    ("qwen2", {"lora_bias": True, "target_modules": ["q_proj"]}, "lora_bias"),
    ("llama", {"modules_to_save": ["lm_head"]}, "saves whole tensors"),
    ("qwen2", {"bias": "all", "target_modules": ["q_proj"]}, "differs from the base's"),
    ("qwen2", {"target_modules": ["embed_tokens"]}, "ties them"),
])
def test_adapters_llama_cpp_cannot_load_are_refused(tmp_path, capsys, family_name, config, needle) -> None:
    base = make_base(tmp_path / "base", family_name, family_name if family_name == "qwen2" else "gpt-2",
                     tied=family_name == "qwen2")
    save_adapter(base, tmp_path / "odd", **{"r": 4, "lora_alpha": 8, **config})
    code, _, err = run(capsys, "export", "--model", tmp_path / "base", "--adapter", tmp_path / "odd",
                       "--adapter-only", "-o", tmp_path / "a.gguf")
    assert code == 1
    only_error_line(err, needle, "export the merged model")
    assert not (tmp_path / "a.gguf").exists()


def test_sentencepiece_style_tokenizer_is_refused(llama_dir) -> None:
    import json

    file = llama_dir / "base" / "tokenizer.json"
    spec = json.loads(file.read_text())
    spec["model"]["byte_fallback"] = True
    file.write_text(json.dumps(spec))
    with pytest.raises(LorakitError, match="byte-level BPE tokenizers"):
        export_gguf(llama_dir / "base", llama_dir / "m.gguf")
    assert not (llama_dir / "m.gguf").exists()


def test_missing_adapter_is_an_adapter_file_error(llama_dir) -> None:
    with pytest.raises(AdapterFileError):
        export_adapter_gguf(llama_dir / "base", llama_dir / "missing", llama_dir / "a.gguf")
    assert not (llama_dir / "a.gguf").exists()
