"""Data-parallel `lorakit train`: the batch sharding, and a real 2-process run on the CPU (torchrun, gloo)
checked against one process with twice the batch size."""

from __future__ import annotations

import json

import pytest
import torch
from torchrun_support import torchrun

from lorakit.errors import LorakitError
from lorakit.train.batching import batches_per_epoch, epoch_batches
from lorakit.train.config import TrainConfig
from lorakit.train.optim import total_optimizer_steps
from lorakit.train.sft import train

# ---- sharding ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_rows", [48, 50, 37, 9])
def test_processes_share_the_batches_of_one_process_with_their_combined_batch_size(n_rows: int) -> None:
    lengths = [(i * 7919) % 113 + 1 for i in range(n_rows)]
    single = epoch_batches(lengths, 8, seed=3, epoch=1)
    per_rank = [epoch_batches(lengths, 2, seed=3, epoch=1, rank=r, world_size=4) for r in range(4)]
    assert len({len(batches) for batches in per_rank}) == 1
    assert len(per_rank[0]) == batches_per_epoch(n_rows, 2, world_size=4)
    # Step by step the 4 processes see exactly the rows that the one process sees (a last global batch with
    # fewer rows than processes is dropped), and every process gets at least one row.
    kept = [batch for batch in single if len(batch) >= 4]
    assert len(kept) == len(per_rank[0])
    for step, batch in enumerate(kept):
        parts = [per_rank[r][step] for r in range(4)]
        assert all(parts) and sorted(i for part in parts for i in part) == sorted(batch)


def test_too_few_rows_for_the_processes_is_refused() -> None:
    config = TrainConfig(batch_size=4, epochs=1.0)
    assert total_optimizer_steps(3, config, world_size=2) == 1
    assert total_optimizer_steps(18, config, world_size=2) == 3  # 2 full global batches of 8, then 1 row each
    assert total_optimizer_steps(17, config, world_size=2) == 2  # a last row alone would leave a process idle
    with pytest.raises(LorakitError, match="too few to give each of 4 processes a batch"):
        total_optimizer_steps(3, config, world_size=4)


# ---- two processes ----------------------------------------------------------------------------------


def test_two_cpu_processes_train_like_one_process_with_twice_the_batch(
    tmp_path, tiny_chat_model_dir, demo_subset
) -> None:
    options = dict(
        model=str(tiny_chat_model_dir),
        data=str(demo_subset["train"]),
        validation_data=str(demo_subset["validation"]),
        test_data=str(demo_subset["test"]),
        max_steps=8,
        eval_every=4,
        learning_rate=5e-3,
        warmup_steps=0,
        # No dropout: its masks depend on how rows are split between processes.
        lora_dropout=0.0,
        eval_limit=4,
        eval_max_new_tokens=4,
        seed=3,
    )
    rank0, rank1 = torchrun("train", {**options, "batch_size": 4, "report_to": ["tensorboard"]}, tmp_path)

    # Both processes end with the same adapter (rank 0 also scored exact match and handed the model back).
    assert rank0 and rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[key], rank1[key]) for key in rank0)

    out = tmp_path / "run"
    report = json.loads((out / "report.json").read_text())
    assert report["processes"] == 2 and report["steps"] == 8 and report["test_rows"] == 4
    assert report["final_val_loss"] < report["base_val_loss"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    two_train = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(two_train) == 8 and two_train[-1] < two_train[0]
    # Only the main process logged to TensorBoard: one event file, holding each step once.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert len(list((out / "logs" / "run").glob("events.out.tfevents.*"))) == 1
    events = EventAccumulator(str(out / "logs" / "run"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 9))
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(two_train, rel=1e-6)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()

    # One process with batch 8 sees the same global batches: same losses and weights up to float rounding
    # (sums in another order, rows padded to another length).
    single = train(TrainConfig.from_options({**options, "output": str(tmp_path / "one"), "batch_size": 8}))
    one = {name: p.detach() for name, p in single.model.named_parameters() if p.requires_grad}
    assert one.keys() == rank0.keys()
    for key in one:
        assert torch.allclose(rank0[key], one[key], atol=1e-5, rtol=0), key
    one_records = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    one_train = [r["loss"] for r in one_records if r["kind"] == "train"]
    assert one_train == pytest.approx(two_train, abs=1e-5)
    assert single.report["final_val_loss"] == pytest.approx(report["final_val_loss"], abs=1e-5)
