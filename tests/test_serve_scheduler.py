"""The scheduling policy of `lorakit serve`: which waiting request gets the next place in the batch.

Short requests first, with ageing (no starvation), fair between adapters (`serve/waiting.py`); the static
scheduler first come first served; admission within `max_batch_size` and the prefill budget
(`serve/scheduler.py`); and with the real batch and the tiny model, every answer equal to the same request
generated alone, whatever the order and step at which the rows joined."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")

from serve_support import save_adapter  # noqa: E402

from lorakit import PeftModel  # noqa: E402
from lorakit.layers import BASE_ROW  # noqa: E402
from lorakit.models.sources import load_causal_lm, load_tokenizer  # noqa: E402
from lorakit.serve.batch import Batch, StepReport  # noqa: E402
from lorakit.serve.engine import Finished, Row  # noqa: E402
from lorakit.serve.metrics import Metrics  # noqa: E402
from lorakit.serve.scheduler import Scheduler  # noqa: E402
from lorakit.serve.server import ModelThread  # noqa: E402
from lorakit.serve.waiting import MAX_COST, WaitingRows  # noqa: E402


def _row(name: str, max_tokens: int, adapter: str = "a", prompt: int = 4) -> Row:
    row = Row(prompt_ids=[1] * prompt, adapter=adapter, max_tokens=max_tokens, emit=lambda event: None)
    row.name = name  # type: ignore[attr-defined]  # a label for the assertions
    return row


def _names(rows) -> list[str]:
    return [row.name for row in rows]


def _drain(queue: WaitingRows) -> list[str]:
    order = []
    while queue.peek() is not None:
        order.append(queue.pop().name)
    return order


# ---- the order of waiting rows ------------------------------------------------------------------------


def test_a_short_row_overtakes_longer_ones_sent_shortly_before_it() -> None:
    """Due step = submitted step + 1 + max_tokens: a short row passes a long one submitted less than the
    difference of their costs (48 - 8 = 40 steps) earlier, and not one submitted longer ago."""
    queue = WaitingRows()
    queue.push(_row("long, step 0", 48), 0)
    queue.push(_row("long, step 5", 48), 5)
    queue.push(_row("short, step 39", 8), 39)  # due 48 < 49 and 54
    queue.push(_row("short, step 46", 8), 46)  # due 55 > 49 and 54
    assert _drain(queue) == ["short, step 39", "long, step 0", "long, step 5", "short, step 46"]


def test_a_long_row_is_not_starved_by_a_stream_of_short_ones() -> None:
    """Overload: two short rows arrive per step, one place frees per step. A long row sent at step 0 gets
    its place once the short rows due before it are gone (those sent before step 40), ~80 steps; shortest
    first without ageing would never admit it."""
    queue = WaitingRows()
    queue.push(_row("long", 48), 0)
    admitted_at = None
    for step in range(400):
        queue.push(_row(f"short {step}a", 8), step)
        queue.push(_row(f"short {step}b", 8), step)
        if queue.pop().name == "long":
            admitted_at = step
            break
    assert admitted_at is not None and 70 <= admitted_at <= 81, admitted_at


def test_a_request_without_a_small_max_tokens_ages_like_one_of_max_cost() -> None:
    queue = WaitingRows()
    queue.push(_row("huge", 100_000), 0)
    queue.push(_row(f"after {MAX_COST - 1} steps", 1), MAX_COST - 1)  # due MAX_COST + 1 = huge's: later seq
    queue.push(_row(f"after {MAX_COST - 2} steps", 1), MAX_COST - 2)
    assert _drain(queue) == [f"after {MAX_COST - 2} steps", "huge", f"after {MAX_COST - 1} steps"]


def test_a_flood_for_one_adapter_takes_turns_with_the_others() -> None:
    """100 queued rows for one adapter; rows for two other adapters sent later are admitted in turn with the
    flood, not after it; equal costs alternate."""
    queue = WaitingRows()
    for i in range(100):
        queue.push(_row(f"flood {i}", 8, "flood"), 0)
    for i in range(3):
        queue.push(_row(f"b {i}", 8, "b"), 1)
        queue.push(_row(f"c {i}", 8, "c"), 2)
    order = _drain(queue)
    assert order[:9] == ["flood 0", "b 0", "c 0", "flood 1", "b 1", "c 1", "flood 2", "b 2", "c 2"]
    assert order[9:] == [f"flood {i}" for i in range(3, 100)]


def test_adapters_share_in_proportion_to_cost() -> None:
    """An adapter of long rows (cost 49) and one of short rows (cost 9), both backlogged: admitted cost is
    shared equally, so ~49/9 short rows per long one, from the start."""
    queue = WaitingRows()
    for i in range(100):
        queue.push(_row(f"long {i}", 48, "l"), 0)
        queue.push(_row(f"short {i}", 8, "s"), 0)
    order = _drain(queue)[:100]  # both still backlogged
    longs = [i for i, name in enumerate(order) if name.startswith("long")]
    assert longs[0] <= 6 and 14 <= len(longs) <= 17, longs  # 100 · 9 / (49 + 9) = 15.5
    assert max(b - a for a, b in zip(longs, longs[1:])) <= 7


def test_an_adapter_of_long_rows_is_not_starved_by_a_stream_of_short_ones_for_another() -> None:
    """Adapter b gets two short rows per step, one row is admitted per step: adapter a's one long row still
    gets its turn after ~49/9 of b's, not when b's stream ends."""
    queue = WaitingRows()
    queue.push(_row("long", 48, "a"), 0)
    for step in range(200):
        queue.push(_row(f"short {step}a", 8, "b"), step)
        queue.push(_row(f"short {step}b", 8, "b"), step)
        if queue.pop().name == "long":
            break
    assert step <= 6, step


def test_a_cancelled_row_does_not_count_against_its_adapter() -> None:
    queue = WaitingRows()
    gone = [_row(f"gone {i}", 48, "a") for i in range(3)]
    for row in gone:
        row.cancelled = True
        queue.push(row, 0)
    queue.push(_row("a", 48, "a"), 0)
    queue.push(_row("b", 48, "b"), 0)
    assert _drain(queue) == ["gone 0", "gone 1", "gone 2", "a", "b"]
    assert len(queue) == 0


def test_static_order_is_first_come_first_served_and_round_robin() -> None:
    queue = WaitingRows(unit_cost=True)
    queue.push(_row("a long", 48, "a"), 0)
    queue.push(_row("a short", 8, "a"), 0)
    queue.push(_row("a short later", 1, "a"), 3)
    queue.push(_row("b long", 48, "b"), 1)
    assert _drain(queue) == ["a long", "b long", "a short", "a short later"]


# ---- admission: places and the prefill budget -----------------------------------------------------------


class _CountingBatch:
    """Stands in for `batch.Batch`: a row gets one token per step (the first at its prefill) and leaves
    with max_tokens tokens; records each step's newcomers."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.admitted: list[list[Row]] = []
        self.sizes: list[int] = []  # rows in the batch after each step's decoding and prefill

    def step(self, model, newcomers) -> StepReport:
        before = list(self.rows)
        for row in before:
            row.tokens.append(0)
            if len(row.tokens) >= row.max_tokens:
                row.finish("length")
        joining = [row for row in newcomers if not row.cancelled]
        for row in joining:
            row.tokens.append(0)
        self.admitted.append(list(newcomers))
        self.sizes.append(sum(not row.done for row in before) + len(joining))
        for row in joining:
            if len(row.tokens) >= row.max_tokens:
                row.finish("length")
        self.rows = [row for row in [*before, *joining] if not row.done]
        return StepReport(tuple(self.rows), tuple(r for r in [*before, *joining] if r.done),
                          sum(len(r.prompt_ids) for r in joining), len(before))


def _schedule(rows: list[Row], batch, model=None, **settings) -> Scheduler:
    """Submit `rows` at once and step until all are done, on one model thread as the server does."""
    async def main() -> Scheduler:
        thread = ModelThread()

        def run_on_model(fn):
            return thread.run(torch.no_grad()(fn))

        scheduler = Scheduler(batch, run_on_model, lambda: model, Metrics("base"), batch_window_ms=0,
                              **settings)
        for row in rows:
            scheduler.submit(row)
        task = asyncio.create_task(scheduler.run())
        while not all(row.done for row in rows):
            await asyncio.sleep(0.001)
        task.cancel()
        if hasattr(batch, "close"):
            await thread.run(batch.close)  # on the thread that entered the batch's adapter block
        thread.close()
        return scheduler

    return asyncio.run(main())


def test_admission_respects_places_and_the_prefill_budget_short_rows_first() -> None:
    long = [_row(f"long {i}", 12, "ab"[i % 2], prompt=30) for i in range(6)]
    short = [_row(f"short {i}", 3, "ab"[i % 2], prompt=30) for i in range(6)]
    alone = _row("wide prompt", 12, "a", prompt=150)
    batch = _CountingBatch()
    _schedule([*long, *short, alone], batch, max_batch_size=4, max_prefill_tokens=100)
    steps = batch.admitted
    assert all(sum(len(r.prompt_ids) for r in step) <= 100 for step in steps if len(step) > 1)
    assert [len(step) for step in steps if any(r.name == "wide prompt" for r in step)] == [1]
    assert max(batch.sizes) == 4
    order = [name for step in steps for name in _names(step)]
    assert order[:6] == [f"short {i}" for i in range(6)]  # every short row before any long one
    assert sorted(order) == sorted(_names([*long, *short, alone]))
    assert all(r.finish_reason == "length" for r in [*long, *short, alone])


def test_a_row_ending_in_this_step_frees_its_place_for_this_steps_prefill() -> None:
    """max_batch_size 2: the rows with 2 tokens end in the second step's decoding, so the next two join
    in that same step (their prefill comes after the decoding), not one step later."""
    def rows() -> list[Row]:
        return [_row(f"first {i}", 2) for i in range(2)] + [_row(f"second {i}", 2) for i in range(2)]

    batch = _CountingBatch()
    _schedule(rows(), batch, max_batch_size=2)
    assert [_names(step) for step in batch.admitted] == [["first 0", "first 1"], ["second 0", "second 1"], []]
    assert max(batch.sizes) == 2
    static = _CountingBatch()
    _schedule(rows(), static, max_batch_size=2, policy="static")
    assert [_names(step) for step in static.admitted] == [
        ["first 0", "first 1"],
        [],
        ["second 0", "second 1"],
        [],
    ]


# ---- correctness with the real batch ------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tiny_chat_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> PeftModel:
    root = tmp_path_factory.mktemp("scheduler-adapters")
    peft = PeftModel.from_pretrained(
        load_causal_lm(tiny_chat_model_dir),
        save_adapter(tiny_chat_model_dir, root / "alpha", 2, 1),
        adapter_name="alpha",
    )
    peft.load_adapter(save_adapter(tiny_chat_model_dir, root / "beta", 4, 2), adapter_name="beta")
    return peft.eval()


@torch.no_grad()
def _alone(model: PeftModel, adapter: str, ids: list[int], n: int) -> list[int]:
    """Greedy tokens of `ids` with `adapter` alone (no batch, no cache)."""
    ids = list(ids)
    for _ in range(n):
        if adapter == BASE_ROW:
            with model.disable_adapter():
                logits = model(input_ids=torch.tensor([ids])).logits
        else:
            model.set_adapter(adapter, inference_mode=True)
            logits = model(input_ids=torch.tensor([ids])).logits
        ids.append(int(logits[0, -1].argmax()))
    return ids[-n:]


def test_each_answer_equals_the_same_request_alone(tiny_chat_model_dir: Path, model: PeftModel) -> None:
    """12 requests over two adapters and the base, of different prompt and answer lengths, through the
    continuous scheduler with 3 places and an 8-token prefill budget: rows join at many different steps,
    shorter ones overtaking; each row's tokens equal those it gets alone."""
    tokenizer = load_tokenizer(tiny_chat_model_dir)
    texts = ["Hi", "A somewhat longer opening prompt for this one", "Count: one two three", "Why?"]
    adapters = ["alpha", "beta", BASE_ROW]
    events: dict[int, list] = {}
    rows = [Row(prompt_ids=tokenizer(texts[i % 4])["input_ids"], adapter=adapters[i % 3],
                max_tokens=[9, 2, 5, 14][i % 4], ignore_eos=True, emit=events.setdefault(i, []).append)
            for i in range(12)]
    batch = Batch(tokenizer, tokenizer.pad_token_id, {tokenizer.eos_token_id})
    joined: list[list[Row]] = []
    step = batch.step

    def recording(model, newcomers):
        joined.append(list(newcomers))
        return step(model, newcomers)

    batch.step = recording  # type: ignore[method-assign]
    _schedule(rows, batch, model, max_batch_size=3, max_prefill_tokens=8)
    assert sum(bool(step) for step in joined) >= 8  # joined at many different steps
    assert all(sum(len(r.prompt_ids) for r in step) <= 8 for step in joined)
    for i, row in enumerate(rows):
        assert row.finish_reason == "length" and isinstance(events[i][-1], Finished)
        assert row.tokens == _alone(model, row.adapter, row.prompt_ids, row.max_tokens), i


def test_a_row_cancelled_while_it_joins_leaves_once(tiny_chat_model_dir: Path, model: PeftModel) -> None:
    """The client leaves on the first token, i.e. its row is cancelled during the step that prefilled it
    (Job.close runs on the event loop while the model thread steps): the row leaves the batch exactly
    once, at the next step, and the row beside it runs on."""
    tokenizer = load_tokenizer(tiny_chat_model_dir)
    batch = Batch(tokenizer, tokenizer.pad_token_id, {tokenizer.eos_token_id})
    ids = tokenizer("Tell me a story")["input_ids"]

    def leave(event) -> None:
        leaving.cancelled = True

    leaving = Row(prompt_ids=ids, adapter="beta", max_tokens=50, ignore_eos=True, emit=leave)
    staying = Row(prompt_ids=ids, adapter="alpha", max_tokens=50, ignore_eos=True, emit=lambda event: None)
    try:
        reports = [batch.step(model, [leaving, staying])] + [batch.step(model, []) for _ in range(3)]
    finally:
        batch.close()
    assert [sum(row is leaving for row in report.left) for report in reports] == [0, 1, 0, 0]
    assert leaving.finish_reason == "cancelled" and len(leaving.tokens) == 1
    assert [[row is staying for row in report.rows] for report in reports] == [[False, True], [True],
                                                                               [True], [True]]
    assert len(staying.tokens) == 4 and not staying.done
