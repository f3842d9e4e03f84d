"""The order in which waiting requests get a place in the batch: short ones first, with ageing, and fair
between adapters.

A row's *cost* is the number of steps it may hold a place: `1 + min(max_tokens, MAX_COST)` (the 1 is its
prefill; the cap keeps a request without a small max_tokens from being pushed back for thousands of steps).
With `unit_cost` (the static scheduler, kept as it was) every row costs 1, and the order below becomes
first come first served within an adapter and round robin between adapters.

Within one adapter — shortest first with ageing. A row submitted at step t is *due* at t + cost; the row
due first goes first (ties: first submitted). So a short row overtakes a longer one submitted before it,
but only if it arrives less than the difference of their costs later: every row is overtaken only by the
rows submitted before its own due step, finitely many, and is never starved.

Between adapters — start-time fair queueing (Goyal, Vin & Cheng, "Start-time fair queueing", SIGCOMM 1996)
with the costs above as packet sizes. The queue has a virtual time V (the largest start tag admitted so
far); each adapter with rows waiting has a start tag S_a, set when its rows start waiting and after each
of its rows is admitted,

    S_a = max(F_a, V),    F_a = S_a + cost of the row admitted (its finish tag),

and fixed while it waits. The next row comes from the adapter whose head (its row due first) would finish
first, smallest S_a + cost(head) (ties: due first, then first submitted). An adapter whose rows were
admitted for more cost has a larger tag, so a flood of requests for one adapter takes turns with the
others, in proportion to cost, instead of delaying them; an adapter that comes back after being idle
starts at V, with no credit saved up. A waiting adapter's tag stays put while every admission raises the
admitted adapter's tag by at least 1, so every waiting adapter's turn comes: no adapter starves. Among
adapters with equal tags the shorter head goes first.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator

from lorakit.serve.engine import Row

MAX_COST = 256  # most steps of a row's max_tokens counted in its cost


class WaitingRows:
    """Rows waiting for a place, in the order of the module docstring."""

    def __init__(self, unit_cost: bool = False) -> None:
        self.unit_cost = unit_cost
        self._heaps: dict[str, list[tuple[int, int, Row]]] = {}  # adapter -> (due, seq, row) heap
        self._start: dict[str, int] = {}  # S_a of adapters with rows waiting
        self._finish: dict[str, int] = {}  # F_a of adapters whose tag is ahead of V or that have rows waiting
        self._virtual = 0  # V
        self._seq = itertools.count()

    def cost(self, row: Row) -> int:
        return 1 if self.unit_cost else 1 + min(row.max_tokens, MAX_COST)

    def __len__(self) -> int:
        return sum(len(heap) for heap in self._heaps.values())

    def __iter__(self) -> Iterator[Row]:
        return (row for heap in self._heaps.values() for _, _, row in heap)

    def push(self, row: Row, step: int) -> None:
        """Queue `row`, submitted at scheduler step `step`."""
        if row.adapter not in self._heaps:
            self._start[row.adapter] = max(self._finish.get(row.adapter, 0), self._virtual)
        heapq.heappush(self._heaps.setdefault(row.adapter, []), (step + self.cost(row), next(self._seq), row))

    def peek(self) -> Row | None:
        """The row to admit next, or None when none waits."""
        adapter = self._next_adapter()
        return None if adapter is None else self._heaps[adapter][0][2]

    def pop(self) -> Row:
        """Take the row `peek` names. A cancelled row is taken without charging its adapter: it never runs."""
        adapter = self._next_adapter()
        if adapter is None:
            raise IndexError("no row is waiting")
        heap = self._heaps[adapter]
        _, _, row = heapq.heappop(heap)
        if not row.cancelled:
            start = self._start[adapter]
            self._finish[adapter] = start + self.cost(row)
            self._virtual = max(self._virtual, start)
            self._start[adapter] = max(self._finish[adapter], self._virtual)
        if not heap:
            del self._heaps[adapter], self._start[adapter]
        # Tags at or behind V say nothing that max(F_a, V) does not: forget them (adapters come and go).
        self._finish = {a: f for a, f in self._finish.items() if f > self._virtual or a in self._heaps}
        return row

    def _next_adapter(self) -> str | None:
        best, choice = None, None
        for adapter, heap in self._heaps.items():
            due, seq, row = heap[0]
            tag = (self._start[adapter] + self.cost(row), due, seq)
            if best is None or tag < best:
                best, choice = tag, adapter
        return choice
