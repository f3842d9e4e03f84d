"""lorakit ↔ PEFT 0.21.2 (the oracle) on tiny random Llama, Mistral and GPT-2.

Adapters saved by one library load in the other with equal logits (fp32, 1e-5), both write the same tensor
names and shapes for the same config, the trainable parameters (names and requires_grad) are PEFT's, fp16 /
bf16 merges are as exact as PEFT's, and `add_weighted_adapter` computes what PEFT computes.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from tiny_models import (
    file_keys,
    file_tensors,
    input_ids,
    logits,
    make_model,
    max_diff,
    perturb_adapter,
    quiet,
    seeded,
)

import lorakit
from lorakit.layers import LoraLayer

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")

GPT2 = {"fan_in_fan_out": True}

# (id, model kind, LoraConfig kwargs): every config is valid in both libraries.
CASES = [
    ("llama-default", "llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    (
        "llama-init-false",
        "llama",
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    ),
    (
        "llama-gaussian-dropout",
        "llama",
        dict(r=4, lora_alpha=8, target_modules=["k_proj"], init_lora_weights="gaussian", lora_dropout=0.1),
    ),
    (
        "mistral-rslora-all-linear",
        "mistral",
        dict(r=4, lora_alpha=16, target_modules="all-linear", use_rslora=True),
    ),
    (
        "llama-rank-alpha-pattern",
        "llama",
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "o_proj"],
            rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6},
            alpha_pattern={"o_proj": 3, "v_proj": 5},
        ),
    ),
    (
        "llama-dora",
        "llama",
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True),
    ),
    (
        "mistral-dora-all-linear",
        "mistral",
        dict(r=2, lora_alpha=4, target_modules="all-linear", use_dora=True, use_rslora=True),
    ),
    ("gpt2-conv1d", "gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc", "c_proj"], **GPT2)),
    (
        "gpt2-conv1d-dora",
        "gpt2",
        dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc", "c_proj"], use_dora=True, **GPT2),
    ),
    ("gpt2-all-linear", "gpt2", dict(r=2, lora_alpha=8, target_modules="all-linear", **GPT2)),
    ("gpt2-bias-all", "gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn"], bias="all", **GPT2)),
    (
        "gpt2-bias-lora-only",
        "gpt2",
        dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], bias="lora_only", **GPT2),
    ),
    (
        "gpt2-lora-bias",
        "gpt2",
        dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], lora_bias=True, **GPT2),
    ),
    (
        "llama-lora-bias",
        "llama",
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], lora_bias=True, init_lora_weights=False),
    ),
    ("llama-embedding", "llama", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])),
    (
        "llama-embedding-dora-mts",
        "llama",
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["embed_tokens", "q_proj"],
            use_dora=True,
            modules_to_save=["lm_head"],
        ),
    ),
    ("llama-lm-head", "llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"])),
    ("llama-regex-embedding", "llama", dict(r=4, lora_alpha=8, target_modules=r".*\.(embed_tokens|v_proj)")),
    ("gpt2-wte", "gpt2", dict(r=4, lora_alpha=8, target_modules=["wte", "c_attn"], **GPT2)),
    (
        "gpt2-modules-to-save",
        "gpt2",
        dict(r=4, lora_alpha=8, target_modules=["c_attn"], modules_to_save=["ln_f"], **GPT2),
    ),
    (
        "mistral-layers-exclude",
        "mistral",
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "gate_proj"],
            layers_to_transform=[1],
            layers_pattern="layers",
        ),
    ),
    (
        "llama-exclude",
        "llama",
        dict(r=4, lora_alpha=8, target_modules="all-linear", exclude_modules=["down_proj", "k_proj"]),
    ),
]
IDS = [c[0] for c in CASES]


def _build(lib, kind: str, kwargs: dict, seed: int = 0):
    with seeded(seed), quiet():
        model = lib.get_peft_model(make_model(kind), lib.LoraConfig(**kwargs))
    perturb_adapter(model, seed=seed + 11)
    return model.eval()


@pytest.mark.parametrize(("kind", "kwargs"), [c[1:] for c in CASES], ids=IDS)
def test_lorakit_adapter_loads_in_peft(tmp_path: Path, kind: str, kwargs: dict) -> None:
    ids = input_ids()
    ours = _build(lorakit, kind, kwargs)
    expected = logits(ours, ids)
    assert max_diff(expected, logits(make_model(kind), ids)) > 1e-2, (
        "the trained adapter must change the output"
    )
    ours.save_pretrained(tmp_path)

    config = peft.LoraConfig.from_pretrained(tmp_path)
    for key, value in kwargs.items():
        got = getattr(config, key)
        if key == "target_modules" and value == "all-linear":
            # Like PEFT, the saved config names the concrete modules that "all-linear" resolved to.
            assert isinstance(got, (set, list)) and got and "lm_head" not in got and "all-linear" not in got
            continue
        assert (set(got) if isinstance(got, (set, list)) else got) == (
            set(value) if isinstance(value, list) else value
        ), key
    assert config.inference_mode is True
    with quiet():
        theirs = peft.PeftModel.from_pretrained(make_model(kind), tmp_path)
    assert max_diff(logits(theirs, ids), expected) <= 1e-5


@pytest.mark.parametrize(("kind", "kwargs"), [c[1:] for c in CASES], ids=IDS)
def test_peft_adapter_loads_in_lorakit(tmp_path: Path, kind: str, kwargs: dict) -> None:
    ids = input_ids()
    theirs = _build(peft, kind, kwargs)
    expected = logits(theirs, ids)
    with quiet():
        theirs.save_pretrained(tmp_path)
    ours = lorakit.PeftModel.from_pretrained(make_model(kind), tmp_path)
    assert max_diff(logits(ours, ids), expected) <= 1e-5
    assert ours.peft_config["default"].r == kwargs["r"]


@pytest.mark.parametrize(("kind", "kwargs"), [c[1:] for c in CASES], ids=IDS)
def test_same_file_keys_and_shapes_as_peft(tmp_path: Path, kind: str, kwargs: dict) -> None:
    _build(lorakit, kind, kwargs).save_pretrained(tmp_path / "lorakit")
    with quiet():
        _build(peft, kind, kwargs).save_pretrained(tmp_path / "peft")
    ours, theirs = file_tensors(tmp_path / "lorakit"), file_tensors(tmp_path / "peft")
    assert set(ours) == set(theirs)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert {k: v.dtype for k, v in ours.items()} == {k: v.dtype for k, v in theirs.items()}


@pytest.mark.parametrize("save_embedding_layers", [True, False])
@pytest.mark.parametrize(("kind", "kwargs"), [
    ("gpt2", dict(r=4, target_modules=["wte", "c_attn"], **GPT2)),
    ("llama", dict(r=4, target_modules=["q_proj"])),
    ("llama", dict(r=4, target_modules=["embed_tokens", "q_proj"])),
], ids=["gpt2-wte", "llama-no-embedding", "llama-embedding"])
def test_save_embedding_layers_keys_match_peft(
    tmp_path: Path, kind: str, kwargs: dict, save_embedding_layers: bool
) -> None:
    ids = input_ids()
    ours = _build(lorakit, kind, kwargs)
    ours.save_pretrained(tmp_path / "lorakit", save_embedding_layers=save_embedding_layers)
    with quiet():
        _build(peft, kind, kwargs).save_pretrained(
            tmp_path / "peft", save_embedding_layers=save_embedding_layers
        )
    assert file_keys(tmp_path / "lorakit") == file_keys(tmp_path / "peft")
    reloaded = lorakit.PeftModel.from_pretrained(make_model(kind), tmp_path / "lorakit")
    assert max_diff(logits(reloaded, ids), logits(ours, ids)) <= 1e-5


def test_resized_vocabulary_saves_embeddings_like_peft(tmp_path: Path) -> None:
    """PEFT saves the whole input/output embeddings when the base named in the config has another vocab
    size."""
    from transformers import AutoModelForCausalLM

    make_model("llama").save_pretrained(tmp_path / "base")

    def resized():
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
        with quiet():
            model.resize_token_embeddings(100, mean_resizing=False)
        with torch.no_grad(), seeded(3):
            model.get_input_embeddings().weight[96:].normal_()
            model.get_output_embeddings().weight[96:].normal_()
        return model

    kwargs = dict(r=4, target_modules=["q_proj"])
    for lib in (lorakit, peft):
        with quiet():
            model = lib.get_peft_model(resized(), lib.LoraConfig(**kwargs))
            model.save_pretrained(tmp_path / lib.__name__)
    keys = file_keys(tmp_path / "lorakit")
    assert keys == file_keys(tmp_path / "peft")
    assert {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"} <= keys


# ---- trainable parameters ------------------------------------------------------------------------

def _grads(model) -> dict[str, bool]:
    return {name: param.requires_grad for name, param in model.named_parameters()}


@pytest.mark.parametrize(("kind", "kwargs"), [c[1:] for c in CASES], ids=IDS)
def test_trainable_parameters_match_peft(kind: str, kwargs: dict) -> None:
    with quiet():
        ours = lorakit.get_peft_model(make_model(kind), lorakit.LoraConfig(**kwargs))
        theirs = peft.get_peft_model(make_model(kind), peft.LoraConfig(**kwargs))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert _grads(ours) == _grads(theirs)


Q = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
K = dict(r=2, lora_alpha=4, target_modules=["k_proj", "v_proj"])
M = dict(Q, modules_to_save=["lm_head"])
G = dict(r=4, lora_alpha=8, target_modules=["c_attn"], **GPT2)
GA = dict(G, bias="all")
GL = dict(G, bias="lora_only", target_modules=["c_attn", "c_fc"])

# Sequences of PeftModel calls: ("get", config) | ("from", config, is_trainable) | ("add", name, config) |
# ("load", name, config, is_trainable) | ("set", name) | ("del", name).
SEQUENCES = [
    ("get", "llama", [("get", M)]),
    ("add-inactive", "llama", [("get", M), ("add", "b", K)]),
    ("add-inactive-mts", "llama", [("get", M), ("add", "b", M)]),
    ("add-set", "llama", [("get", M), ("add", "b", M), ("set", "b")]),
    ("add-set-set", "llama", [("get", M), ("add", "b", K), ("set", "b"), ("set", "default")]),
    ("from-frozen", "llama", [("from", M, False)]),
    ("from-trainable", "llama", [("from", M, True)]),
    ("from-frozen-load-trainable", "llama", [("from", M, False), ("load", "b", K, True)]),
    ("from-trainable-load-frozen", "llama", [("from", M, True), ("load", "b", K, False)]),
    ("load-trainable-set", "llama", [("from", M, False), ("load", "b", M, True), ("set", "b")]),
    ("load-delete-active", "llama", [("from", Q, True), ("load", "b", M, True), ("del", "default")]),
    ("add-delete-inactive", "llama", [("get", Q), ("add", "b", M), ("del", "b")]),
    ("delete-empties-layer", "llama", [("get", Q), ("add", "c", K), ("set", "c"), ("del", "c")]),
    ("gpt2-bias-all", "gpt2", [("get", GA)]),
    ("gpt2-bias-lora-only", "gpt2", [("get", GL)]),
    ("gpt2-bias-add-inactive", "gpt2", [("get", GA), ("add", "b", G)]),
    ("gpt2-from-bias-trainable", "gpt2", [("from", GL, True)]),
    ("gpt2-load-bias-adapter", "gpt2", [("from", G, True), ("load", "b", GA, True)]),
]


def _run_sequence(lib, kind: str, steps: list, adapters: dict) -> object:
    model = None
    with quiet():
        for op, *args in steps:
            if op == "get":
                model = lib.get_peft_model(make_model(kind), lib.LoraConfig(**args[0]))
            elif op == "from":
                model = lib.PeftModel.from_pretrained(
                    make_model(kind), adapters[json.dumps(args[0])], is_trainable=args[1]
                )
            elif op == "add":
                model.add_adapter(args[0], lib.LoraConfig(**args[1]))
            elif op == "load":
                model.load_adapter(adapters[json.dumps(args[1])], args[0], is_trainable=args[2])
            elif op == "set":
                model.set_adapter(args[0])
            elif op == "del":
                model.delete_adapter(args[0])
    return model


@pytest.fixture(scope="module")
def saved_adapters(tmp_path_factory) -> dict[str, Path]:
    """PEFT-saved adapters for every config the sequences load, keyed by the config's JSON."""
    root = tmp_path_factory.mktemp("sequence-adapters")
    out = {}
    for i, (kind, config) in enumerate(
        [("llama", Q), ("llama", K), ("llama", M), ("gpt2", G), ("gpt2", GA), ("gpt2", GL)]
    ):
        with quiet():
            peft.get_peft_model(make_model(kind), peft.LoraConfig(**config)).save_pretrained(root / str(i))
        out[json.dumps(config)] = root / str(i)
    return out


@pytest.mark.parametrize(("kind", "steps"), [s[1:] for s in SEQUENCES], ids=[s[0] for s in SEQUENCES])
def test_trainable_parameters_match_peft_after_sequences(saved_adapters, kind: str, steps: list) -> None:
    ours = _run_sequence(lorakit, kind, steps, saved_adapters)
    theirs = _run_sequence(peft, kind, steps, saved_adapters)
    assert ours.active_adapter == theirs.active_adapter
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert _grads(ours) == _grads(theirs)


# Where PEFT 0.21.2's bookkeeping is inconsistent, lorakit follows one rule instead: base biases trained by
# an adapter (bias="all"/"lora_only") are trainable exactly while that adapter is the active, trainable one,
# and a deleted active adapter is replaced exactly as `set_adapter(new)` would.
def _b_params(name: str) -> bool:
    return ".b." in name


DIVERGENT = [
    # PEFT leaves the base biases trainable on a model loaded for inference (is_trainable=False).
    ("gpt2-from-bias-frozen", "gpt2", [("from", GA, False)], lambda name: False),
    # PEFT keeps default's biases training while adapter b (bias="none") is the one being trained, so
    # training b silently changes default.
    ("gpt2-bias-switch-away", "gpt2", [("get", GA), ("add", "b", G), ("set", "b")], _b_params),
    # PEFT never makes b's biases trainable, although b has bias="lora_only" and is active and trainable
    # (and saving b writes those biases).
    (
        "gpt2-bias-switch-to",
        "gpt2",
        [("from", G, False), ("load", "b", GL, True), ("set", "b")],
        lambda name: _b_params(name) or name.endswith(("c_attn.base_layer.bias", "c_fc.base_layer.bias")),
    ),
    # After deleting the active adapter, PEFT makes b's LoRA factors trainable but not its lm_head copy.
    (
        "delete-active-mts",
        "llama",
        [("from", Q, False), ("load", "b", M, False), ("del", "default")],
        _b_params,
    ),
]


@pytest.mark.parametrize(
    ("kind", "steps", "trainable"), [s[1:] for s in DIVERGENT], ids=[s[0] for s in DIVERGENT]
)
def test_trainable_parameters_where_peft_is_inconsistent(
    saved_adapters, kind: str, steps: list, trainable
) -> None:
    ours = _run_sequence(lorakit, kind, steps, saved_adapters)
    theirs = _run_sequence(peft, kind, steps, saved_adapters)
    assert set(_grads(ours)) == set(_grads(theirs))
    assert _grads(ours) != _grads(theirs), "PEFT changed: re-check this case against it"
    assert _grads(ours) == {name: trainable(name) for name in _grads(ours)}


def test_two_adapters_training_biases_are_refused() -> None:
    model = lorakit.get_peft_model(make_model("gpt2"), lorakit.LoraConfig(**GA))
    with pytest.raises(ValueError, match="only one adapter may use bias"):
        model.add_adapter("b", lorakit.LoraConfig(**GL))
    assert list(model.peft_config) == ["default"]


def test_print_trainable_parameters_matches_peft() -> None:
    outputs = []
    for lib in (lorakit, peft):
        with quiet():
            model = lib.get_peft_model(make_model("llama"), lib.LoraConfig(**M))
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            model.print_trainable_parameters()
        outputs.append(buffer.getvalue())
    assert outputs[0] == outputs[1]
    assert outputs[0].startswith("trainable params: 3,968 || all params: 28,704 || trainable%: ")


def test_save_layout_with_selected_adapters_matches_peft(tmp_path: Path) -> None:
    def layout(root: Path) -> set[str]:
        return {str(p.relative_to(root)) for p in root.rglob("*") if p.name != "README.md"}

    for lib in (lorakit, peft):
        with quiet():
            model = lib.get_peft_model(make_model("llama"), lib.LoraConfig(**Q))
            model.add_adapter("other", lib.LoraConfig(**K))
            model.add_adapter("third", lib.LoraConfig(**K))
            model.save_pretrained(tmp_path / lib.__name__ / "all")
            model.save_pretrained(tmp_path / lib.__name__ / "some", selected_adapters=["default", "other"])
            model.save_pretrained(tmp_path / lib.__name__ / "one", selected_adapters=["third"])
    for case in ("all", "some", "one"):
        assert layout(tmp_path / "lorakit" / case) == layout(tmp_path / "peft" / case), case
        for sub in layout(tmp_path / "lorakit" / case):
            if sub.endswith(".safetensors"):
                path = (tmp_path / "lorakit" / case / sub).parent
                assert file_keys(path) == file_keys(tmp_path / "peft" / case / Path(sub).parent)
    assert layout(tmp_path / "lorakit" / "one") == {
        "third",
        "third/adapter_config.json",
        "third/adapter_model.safetensors",
    }


# ---- fp16 / bf16 merges ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(("kind", "extra"), [
    ("llama", {}), ("llama", {"use_dora": True}), ("gpt2", GPT2), ("gpt2", {**GPT2, "use_dora": True}),
], ids=["llama", "llama-dora", "gpt2", "gpt2-dora"])
def test_low_precision_merge_gap_no_larger_than_peft(
    tmp_path: Path, dtype: torch.dtype, kind: str, extra: dict
) -> None:
    """Load one saved adapter into both libraries on the same fp16/bf16 base and compare, per library, the
    largest |merged − unmerged| logit. lorakit merges in float32 and rounds once, like PEFT on the CPU."""
    kwargs = dict(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False, **extra)
    source = _build(lorakit, kind, kwargs)
    perturb_adapter(source, scale=0.5)
    source.save_pretrained(tmp_path)
    ids = input_ids(4, 6)
    gaps, merged_logits = {}, {}
    for lib in (lorakit, peft):
        with quiet():
            model = lib.PeftModel.from_pretrained(make_model(kind, dtype=dtype), tmp_path)
        unmerged = logits(model, ids)
        model.merge_adapter()
        merged_logits[lib.__name__] = logits(model, ids)
        gaps[lib.__name__] = max_diff(unmerged, merged_logits[lib.__name__])
    assert gaps["lorakit"] <= gaps["peft"] * 1.0 + 1e-6, gaps
    assert max_diff(merged_logits["lorakit"], merged_logits["peft"]) == 0.0


# ---- add_weighted_adapter ----------------------------------------------------------------------------

WEIGHTED = [
    (
        "llama",
        [
            dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
            dict(r=4, lora_alpha=16, target_modules=["v_proj", "o_proj"]),
        ],
    ),
    (
        "gpt2",
        [
            dict(r=4, lora_alpha=8, target_modules=["c_attn"], **GPT2),
            dict(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], **GPT2),
        ],
    ),
    (
        "llama",
        [
            dict(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"]),
            dict(r=4, lora_alpha=4, target_modules=["q_proj", "embed_tokens"], use_rslora=True),
        ],
    ),
]


@pytest.fixture(scope="module")
def weighted_sources(tmp_path_factory) -> list[tuple[str, list[Path]]]:
    root = tmp_path_factory.mktemp("weighted")
    out = []
    for i, (kind, configs) in enumerate(WEIGHTED):
        dirs = []
        for j, config in enumerate(configs):
            model = _build(peft, kind, config, seed=j)
            with quiet():
                model.save_pretrained(root / f"{i}-{j}")
            dirs.append(root / f"{i}-{j}")
        out.append((kind, dirs))
    return out


def _weighted(lib, kind: str, dirs: list[Path], **kwargs):
    with quiet():
        model = lib.PeftModel.from_pretrained(make_model(kind), dirs[0], adapter_name="x")
        model.load_adapter(dirs[1], "y")
        model.add_weighted_adapter(["x", "y"], [0.7, -0.4], "w", **kwargs)
    model.set_adapter("w")
    return model


@pytest.mark.parametrize("combination", [
    {"combination_type": "linear"}, {"combination_type": "cat"}, {"combination_type": "svd"},
    {"combination_type": "svd", "svd_rank": 3, "svd_clamp": 0.9},
], ids=["linear", "cat", "svd", "svd-rank3-clamp"])
@pytest.mark.parametrize(
    "case", range(len(WEIGHTED)), ids=["llama", "gpt2-ranks-2-4", "llama-embedding-rslora"]
)
def test_add_weighted_adapter_matches_peft(weighted_sources, case: int, combination: dict) -> None:
    kind, dirs = weighted_sources[case]
    if combination["combination_type"] == "linear" and case == 1:
        for lib in (lorakit, peft):
            with pytest.raises(ValueError):
                _weighted(lib, kind, dirs, **combination)
        return
    ids = input_ids()
    ours, theirs = _weighted(lorakit, kind, dirs, **combination), _weighted(peft, kind, dirs, **combination)
    ours_config, theirs_config = ours.peft_config["w"], theirs.peft_config["w"]
    assert (ours_config.r, ours_config.lora_alpha) == (theirs_config.r, theirs_config.lora_alpha)
    assert set(ours_config.target_modules) == set(theirs_config.target_modules)
    assert max_diff(logits(ours, ids), logits(theirs, ids)) <= 1e-5
    # The new adapter's update ΔW per layer (SVD factors may differ in sign, their product may not).
    for name, layer in ours.base_model.model.named_modules():
        if isinstance(layer, LoraLayer) and "w" in layer.r:
            other = theirs.base_model.model.get_submodule(name)
            assert max_diff(layer.delta_weight("w"), other.get_delta_weight("w")) <= 1e-5, name
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
