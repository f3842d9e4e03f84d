"""GGUF in, GGUF out (issue 22): the embedded model (converted from a GGUF), fine-tuned, merged and exported
to GGUF, answers the bundled date task as the merged model does.

A cut-down run of `benchmarks/gguf_export.py` (`make bench-gguf` is the full one: one epoch, all 100 test
rows, figures in benchmarks/README.md): 40 training steps, the first 40 test rows. f16 and q8_0
must answer within one row of the float32 merge (the full run's "1 point" is one row of 100); f16 must
pick the merge's top-1 token at every position of the test conversations.

q8_0 is llama.cpp's converter's q8_0 byte for byte (test_export_gguf.py). Over all 2,516 positions it
agrees at 96.8 % (perplexity 17.49 → 17.27), held to ≥ 95 %: the 40 rows share their first 36 tokens
(system prompt and instruction), so a flip there counts 40 times. Over the 1,073 distinct contexts
(each token prefix once) it measured 99.7 %: 3 flips, each where the merge's own top two are within
0.05 logits (q8_0 moves the logits by 0.18 RMS); held to issue 22's 99 % and a largest gap < 0.5
(benchmarks/README.md). With llama-cpp-python installed, llama.cpp's own answers are held to the same
one-row bound as f16's.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROWS = 40


@pytest.mark.slow
def test_fine_tuned_embedded_model_exported_to_gguf_answers_like_the_merge(tmp_path,
                                                                            default_model_dir) -> None:
    script = REPO / "benchmarks" / "gguf_export.py"
    done = subprocess.run([sys.executable, str(script), "--max-steps", "40", "--rows", str(ROWS),
                           "--output", str(tmp_path)], capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(result, indent=2))
    merged = result["exact_match_merged"]
    assert merged >= 0.8
    for kind in ("f16", "q8_0"):
        assert abs(result[kind]["exact_match"] - merged) <= 1 / ROWS + 1e-9
    assert result["f16"]["top1_agreement"] >= 0.999
    q8_0 = result["q8_0"]
    assert q8_0["top1_agreement"] >= 0.95
    assert q8_0["top1_agreement_distinct"] >= 0.99 and q8_0["largest_gap"] < 0.5
    for kind in ("f16", "q8_0"):
        assert math.isfinite(result[kind]["perplexity"]) and math.isfinite(result[kind]["perplexity_merged"])
    if result["llama_cpp"] is not None:
        assert abs(result["llama_cpp"]["exact_match_f16"] - merged) <= 1 / ROWS + 1e-9
        assert abs(result["llama_cpp"]["exact_match_base_plus_adapter"] - merged) <= 1 / ROWS + 1e-9
