"""Which waiting requests join the running batch, and when: the scheduling policy of `lorakit serve`.

Continuous batching (the default, `--scheduler continuous`):

* The model thread runs steps back to back while there is work. A step is one decoding token for every
  running row, then the prefill of the rows admitted for this step, which join the batch (`batch.Batch`).
  A request that arrives during a step joins at the next one: it never waits for the batch to drain.
* Admission, before each step: waiting rows join, in the order of `waiting.WaitingRows` (short requests
  first, with ageing so that long ones are not starved; fair between adapters), while the batch holds
  fewer than `max_batch_size` rows and the prompts admitted for this step hold at most
  `max_prefill_tokens` tokens together. A prompt longer than that is admitted alone when its turn comes,
  so it cannot wait forever. Rows that end in this step's decoding (their last token by max_tokens, or
  their client gone) already count as gone: the newcomers' prefill comes after the decoding, so their
  places are free by then. The budget bounds how long newcomers' prefill stalls the running rows.
* Rows leave in the step where they finish (end of sequence, stop string, max_tokens, error) or where their
  client is found gone; a cancelled waiting row is dropped when its turn comes, without taking a place.
* When idle, the first request waits `batch_window_ms` so that requests sent at the same moment are
  prefilled together.

Static batching (`--scheduler static`, the batching of before, kept to measure against): rows are admitted
only when the batch is empty, after the same window, up to `max_batch_size` of them (no prefill budget:
no running row waits for their prefill), first come first served within an adapter and round robin
between adapters; newcomers wait for the whole batch to end.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable

from torch import nn

from lorakit.serve.batch import Batch, StepReport
from lorakit.serve.engine import Row
from lorakit.serve.metrics import Metrics
from lorakit.serve.waiting import WaitingRows

log = logging.getLogger("lorakit.serve")
SCHEDULERS = ("continuous", "static")
RunStep = Callable[[Callable[[], StepReport]], Awaitable[StepReport]]  # runs a step on the model thread


class Scheduler:
    """Admits waiting rows into `batch` and runs its steps on the model thread (`run_on_model`)."""

    def __init__(self, batch: Batch, run_on_model: RunStep,
                 model: Callable[[], nn.Module], metrics: Metrics, *, policy: str = "continuous",
                 max_batch_size: int = 16, max_prefill_tokens: int = 512,
                 batch_window_ms: float = 5.0) -> None:
        if policy not in SCHEDULERS:
            raise ValueError(f"scheduler {policy!r}: use one of {', '.join(SCHEDULERS)}")
        self.batch, self.policy, self.metrics = batch, policy, metrics
        self.max_batch_size, self.max_prefill_tokens = max_batch_size, max_prefill_tokens
        self._window = batch_window_ms / 1000
        self._run, self._model = run_on_model, model
        self._waiting = WaitingRows(unit_cost=policy == "static")
        self._work = asyncio.Event()
        self.running: tuple[Row, ...] = ()
        self.steps = 0
        self.largest_batch = 0

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, row: Row) -> None:
        self._waiting.push(row, self.steps)
        self.metrics.set_queue(len(self.running), self.waiting)
        self._work.set()

    async def run(self) -> None:
        """Step until cancelled (started by the app's lifespan)."""
        while True:
            if not self.running:
                await self._work.wait()
                self._work.clear()
                if self._window:
                    await asyncio.sleep(self._window)  # let requests sent at the same moment arrive
            newcomers = self._admit()
            if not newcomers and not self.running:
                continue
            try:
                report = await self._run(lambda rows=newcomers: self.batch.step(self._model(), rows))
            except Exception as err:  # must not stop the server: the rows in flight get the error
                log.exception("scheduler step failed")
                report = await self._run(lambda error=err, rows=newcomers: self.batch.abort(error, rows))
            self.running = report.rows
            self.steps += 1
            self.largest_batch = max(self.largest_batch, len(report.rows) + len(report.left))
            self.metrics.step(report, self.waiting)
            if self._waiting:
                self._work.set()

    def _admit(self) -> list[Row]:
        """The waiting rows that join the batch at the next step (see the module docstring)."""
        if self.policy == "static" and self.running:
            return []
        staying = sum(not (row.cancelled or len(row.tokens) + 1 >= row.max_tokens) for row in self.running)
        budget = self.max_prefill_tokens if self.policy == "continuous" else sys.maxsize
        room, chosen = self.max_batch_size - staying, []
        while room > 0 and (row := self._waiting.peek()) is not None:
            if not row.cancelled and chosen and len(row.prompt_ids) > budget:
                break
            self._waiting.pop()
            chosen.append(row)  # a cancelled one too: the step ends it without running it (and reports it)
            if not row.cancelled:
                room, budget = room - 1, budget - len(row.prompt_ids)
        return chosen

    def cancel_all(self) -> None:
        """At shutdown: every running and waiting row stops at the next step."""
        for row in [*self.running, *self._waiting]:
            row.cancelled = True
