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
    parser.addoption(
        "--llama-cpp",
        action="store_true",
        help="run the tests marked llama_cpp (needs `make llama-cpp`; `make test-llama-cpp` does both)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that need what this machine lacks are deselected (listed as such, never silently skipped):
    - `llama_cpp`: llama.cpp built from source (~20 min here); `make test-llama-cpp` (`--llama-cpp`) runs
      them, and there a missing build is an error;
    - `cuda`: a CUDA GPU; they run where torch sees one (benchmarks/gpu/run.sh runs `pytest -m cuda`), or
      on the CPU as a dry run with LORAKIT_TEST_DEVICE=cpu (tests/test_cuda.py)."""
    import torch

    lacking = set()
    if not config.getoption("--llama-cpp"):
        lacking.add("llama_cpp")
    if not torch.cuda.is_available() and os.environ.get("LORAKIT_TEST_DEVICE") != "cpu":
        lacking.add("cuda")
    deselected = [item for item in items if any(item.get_closest_marker(name) for name in lacking)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if item not in deselected]
