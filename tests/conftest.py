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
