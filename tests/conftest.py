"""Shared pytest fixtures.

The lorakit cache points into the repository (`.cache/lorakit`, git-ignored) for the whole session, set in
os.environ before any test runs so that CLI subprocesses inherit it: the embedded model is converted once
per clone (about 20 s) and every later test run reuses it, without touching the user's ~/.cache.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
os.environ["LORAKIT_CACHE"] = str(REPO_ROOT / ".cache" / "lorakit")


def _skip_cuda_tests_without_a_gpu(items: list[pytest.Item]) -> None:
    """Tests marked `cuda` are skipped where torch sees no CUDA GPU (they run on GPU machines:
    benchmarks/gpu/run.sh runs `pytest -m cuda`), unless LORAKIT_TEST_DEVICE=cpu asks for a dry run of them
    on the CPU (tests/test_cuda.py)."""
    import torch

    if torch.cuda.is_available() or os.environ.get("LORAKIT_TEST_DEVICE") == "cpu":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a local transformers directory (converted on first use)."""
    from lorakit import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def tiny_chat_model_dir(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (hidden 32, 2 layers) with the embedded model's tokenizer and chat template:
    fast enough for end-to-end training tests, real enough for the data pipeline."""
    from tiny_models import tiny_llama
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    model = tiny_llama(perturb=False, vocab_size=len(tokenizer), max_position_embeddings=512,
                       tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    directory = tmp_path_factory.mktemp("tiny-chat-model")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def demo_subset(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small train/validation/test files cut from the bundled demo dataset."""
    from lorakit.train.data import bundled_dataset_path

    directory = tmp_path_factory.mktemp("demo-subset")
    sizes = {"train": 48, "validation": 16, "test": 8}
    paths = {}
    for split, size in sizes.items():
        lines = bundled_dataset_path(split).read_text(encoding="utf-8").splitlines()[:size]
        paths[split] = directory / f"{split}.jsonl"
        paths[split].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--llama-cpp", action="store_true",
                     help="run the tests marked llama_cpp (needs `make llama-cpp`; `make test-llama-cpp` does both)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `llama_cpp` need llama.cpp built from source (~20 min here), so `make test` deselects
    them and `make test-llama-cpp` (`--llama-cpp`) runs them; there a missing build is an error, not a skip.
    Tests marked `cuda` are skipped without a GPU (`_skip_cuda_tests_without_a_gpu`)."""
    _skip_cuda_tests_without_a_gpu(items)
    if config.getoption("--llama-cpp"):
        return
    needs = [item for item in items if item.get_closest_marker("llama_cpp")]
    if needs:
        config.hook.pytest_deselected(items=needs)
        items[:] = [item for item in items if not item.get_closest_marker("llama_cpp")]

