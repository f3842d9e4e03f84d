"""llama.cpp itself runs what `lorakit export --format gguf` writes (issue 22): the merged model, and the base
with the GGUF LoRA adapter, give lorakit's greedy tokens; llama.cpp's tokenizer, built from the GGUF
metadata alone, gives transformers' token ids.

llama.cpp comes from the `llama-cpp-python` source distribution (it vendors llama.cpp), built by
`make llama-cpp` (about 20 minutes on 2 cores), so these tests are marked `llama_cpp`: `make test` deselects
them and `make test-llama-cpp` builds llama.cpp and runs them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf_models import CASES, NEW_TOKENS, build_family, greedy, load_dir, quiet

import lorakit
from lorakit.export import export_adapter_gguf, export_gguf

pytestmark = [pytest.mark.slow, pytest.mark.llama_cpp]


@pytest.fixture(scope="module")
def llama_cpp():
    try:
        import llama_cpp
    except ImportError as err:
        raise RuntimeError(
            "llama-cpp-python is not installed; `make llama-cpp` builds it from its sdist"
        ) from err
    return llama_cpp


@pytest.fixture(scope="module", params=list(CASES))
def family(request, tmp_path_factory, default_model_dir, llama_cpp) -> dict:
    root = tmp_path_factory.mktemp(f"llama-cpp-{request.param}")
    return build_family(request.param, root, default_model_dir)


def llama_greedy(model, ids: list[int]) -> tuple[list[int], np.ndarray]:
    """llama.cpp's greedy continuation (argmax of its logits at every step) and its logits for the prompt,
    on a fresh context (reset() would keep the previous prompt's KV cache entries)."""
    model.eval(ids)
    prompt = np.array(model.scores[: len(ids)])
    out = []
    for _ in range(NEW_TOKENS):
        out.append(int(np.argmax(model.scores[model.n_tokens - 1])))
        model.eval(out[-1:])
    return out, prompt


def open_llama(llama_cpp, path, lora=None):
    return llama_cpp.Llama(model_path=str(path), lora_path=None if lora is None else str(lora), n_ctx=256,
                           n_threads=2, logits_all=True, verbose=False, seed=0)


def test_llama_cpp_runs_the_merged_model_and_the_adapter(family, llama_cpp) -> None:
    root, tok = family["root"], family["tokenizer"]
    export_gguf(root / "base", root / "merged.gguf", [root / "adapter"], type="f32")
    export_gguf(root / "base", root / "base.gguf", type="f32")
    export_adapter_gguf(root / "base", root / "adapter", root / "adapter.gguf", type="f32")
    merged = load_dir(root / "merged")
    with quiet():
        adapted = lorakit.PeftModel.from_pretrained(load_dir(root / "base"), root / "adapter").eval()
    runs = {"merged": (root / "merged.gguf", None),
            "base + adapter": (root / "base.gguf", root / "adapter.gguf")}
    for ids in family["prompts"]:
        text = tok.decode(ids)
        expected = greedy(merged, ids)
        assert greedy(adapted, ids) == expected
        with torch.no_grad():
            logits = merged(torch.tensor([ids])).logits[0].numpy()
        for name, files in runs.items():
            model = open_llama(llama_cpp, *files)
            assert model.tokenize(text.encode(), add_bos=False, special=True) == ids, name
            tokens, prompt_logits = llama_greedy(model, ids)
            assert tokens == expected, name
            # llama.cpp keeps its KV cache in f16 by default: logits agree to ~1e-3, not to float32 rounding
            assert np.abs(prompt_logits - logits).max() <= 5e-3, name
