"""lm-evaluation-harness against `lorakit serve` (`local-completions`) and against transformers + PEFT
(`hf`), on the same adapter and the same small local tasks: the scores must be equal.

Two tasks built from the bundled date-normalisation test split (no hub access):

* `lorakit_dates_mc` (loglikelihood): the question, then four candidate dates (the right one and three
  other rows' answers); metrics acc and acc_norm. Through the server this is lm-eval's `echo` +
  `logprobs` request on token-id prompts.
* `lorakit_dates_gen` (generate_until): greedy answer up to a newline, metric exact_match.

    make eval-serve                                    # sets up .venv-lmeval, then runs this
    .venv-lmeval/bin/python benchmarks/lm_eval_serve.py [--adapter DIR] [--limit 40]

Without --adapter, a random rank-8 adapter (non-zero B) for the embedded SmolLM2-135M-Instruct is made
in a temporary directory. Exits 1 if any score differs. Needs lm-eval (`pip install lm-eval`), which this
script does not import from lorakit's own environment: see the Makefile's eval-serve target.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TASKS = {
    "lorakit_dates_mc": """task: lorakit_dates_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/mc.jsonl
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    "lorakit_dates_gen": """task: lorakit_dates_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/gen.jsonl
output_type: generate_until
test_split: test
doc_to_text: "{{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 16
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
""",
}


# One worked example before each question, so that the small base model answers in the expected format.
ONE_SHOT = "Normalize 3 January 2019 to YYYY-MM-DD.\nAnswer: 2019-01-03\n\n"


def write_tasks(directory: Path, limit: int) -> None:
    """The two tasks' data (jsonl) and YAMLs, from the bundled test split."""
    from lorakit.train.data import bundled_dataset_path

    rows = [json.loads(line)["messages"] for line in
            bundled_dataset_path("test").read_text(encoding="utf-8").splitlines()[:limit]]
    # Answers keep the space that follows "Answer:"; it also keeps the json loader from reading them as dates.
    docs = [{"question": m[1]["content"].split("\n\n")[-1], "answer": " " + m[2]["content"]} for m in rows]
    with open(directory / "mc.jsonl", "w", encoding="utf-8") as mc, open(directory / "gen.jsonl", "w") as gen:
        for i, doc in enumerate(docs):
            others = [docs[(i + k) % len(docs)]["answer"] for k in (1, 2, 3)]
            gold = i % 4
            choices = others[:gold] + [doc["answer"]] + others[gold:]
            question = f"{ONE_SHOT}Normalize {doc['question']} to YYYY-MM-DD."
            mc.write(json.dumps({"question": question, "choices": choices, "gold": gold}) + "\n")
            gen.write(json.dumps({"question": question, "answer": doc["answer"]}) + "\n")
    for name, text in TASKS.items():
        (directory / f"{name}.yaml").write_text(text.format(data=directory), encoding="utf-8")


def random_adapter(directory: Path) -> Path:
    import torch

    from lorakit import LoraConfig, get_peft_model
    from lorakit.models.sources import load_causal_lm

    torch.manual_seed(0)
    model = get_peft_model(load_causal_lm(None), LoraConfig(r=8, lora_alpha=2, init_lora_weights=False,
                                                             target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(directory)
    return directory


def serve(model_dir: Path, adapter: Path, port: int, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "lorakit", "serve", "--model", str(model_dir), "--port", str(port),
               "--adapter", f"dates={adapter}", "--max-batch-size", "16"]
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read()
            return process
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"lorakit serve did not start:\n{log.read_text()[-3000:]}") from None
            time.sleep(0.5)


def evaluate(model: str, model_args: dict, tasks: Path, batch_size: int) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    result = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(TASKS),
                                     batch_size=batch_size,
                                     task_manager=TaskManager(include_path=str(tasks)), log_samples=True)
    return result


def loglikelihoods(result: dict) -> dict[tuple[int, int], float]:
    """(document, choice) -> the loglikelihood lm-eval got for it."""
    return {(s["doc_id"], i): float(r[0][0]) for s in result["samples"]["lorakit_dates_mc"]
            for i, r in enumerate(s["resps"])}


def generations(result: dict) -> dict[int, str]:
    return {s["doc_id"]: s["filtered_resps"][0] for s in result["samples"]["lorakit_dates_gen"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", type=Path, default=None,
                        help="a PEFT-format adapter of the embedded model")
    parser.add_argument("--limit", type=int, default=40, help="documents per task")
    args = parser.parse_args()
    from lorakit import default_model_path

    model_dir = default_model_path()
    with tempfile.TemporaryDirectory() as tmp:
        tasks = Path(tmp) / "tasks"
        tasks.mkdir()
        write_tasks(tasks, args.limit)
        adapter = args.adapter or random_adapter(Path(tmp) / "adapter")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        server = serve(model_dir, adapter, port, Path(tmp) / "serve.log")
        try:
            start = time.perf_counter()
            served = evaluate("local-completions", {
                "model": "dates", "base_url": f"http://127.0.0.1:{port}/v1/completions",
                "tokenizer": str(model_dir), "tokenizer_backend": "huggingface", "num_concurrent": 8,
                "max_retries": 1, "timeout": 3600}, tasks, batch_size=4)
            served_s = time.perf_counter() - start
        finally:
            server.terminate()
            server.wait(timeout=60)
        start = time.perf_counter()
        local = evaluate("hf", {"pretrained": str(model_dir), "peft": str(adapter), "dtype": "float32",
                                "device": "cpu"}, tasks, batch_size=1)
        local_s = time.perf_counter() - start
    report(served, local, served_s, local_s, args.limit)


def report(served: dict, local: dict, served_s: float, local_s: float, limit: int) -> None:
    print(f"\n{limit} documents per task; lorakit serve {served_s:.0f} s, hf + PEFT {local_s:.0f} s\n")
    print("| task | metric | lorakit serve (local-completions) | hf + PEFT | equal |")
    print("|---|---|---:|---:|---|")
    same = True
    for task in TASKS:
        for key, value in served["results"][task].items():
            if key.endswith(",none") and "stderr" not in key:
                other = local["results"][task][key]
                same &= value == other
                print(f"| {task} | {key.split(',')[0]} | {value:.4f} | {other:.4f} | {value == other} |")
    ours, theirs = loglikelihoods(served), loglikelihoods(local)
    gap = max(abs(ours[key] - theirs[key]) for key in theirs)
    print(f"\nlargest difference between the two runs' loglikelihoods (all {len(theirs)} choices): {gap:.2e}")
    texts, reference = generations(served), generations(local)
    same_texts = sum(texts[d] == reference[d] for d in reference)
    print(f"identical generations: {same_texts}/{len(reference)}; e.g. {texts[0]!r} and {reference[0]!r}")
    if not same:
        raise SystemExit("the scores differ")


if __name__ == "__main__":
    main()
