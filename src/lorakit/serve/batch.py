"""The running batch: rows join between decoding steps and leave the moment they finish.

Why a decoding loop of our own rather than `model.generate`: `generate` runs a fixed batch in lockstep, with
one set of sampling settings, and no row can join or leave it. Here the batch is a set of rows with one KV
cache (`DynamicCache`, one (rows, heads, width, head_dim) key and value tensor per layer) that changes
shape between steps:

* joining: newcomers' prompts are prefilled together (left-padded, one forward, their own cache; rows
  with the same prompt and adapter share one row of it), then their cache is concatenated to the
  running one along the batch dimension, the narrower of the two left-padded with zeros to the common
  width (masked out by the attention mask);
* leaving: finished and cancelled rows are dropped from the cache (`batch_select_indices`), and the
  leading columns that are padding for every remaining row are cut off, so the width follows the longest
  live row rather than the longest row ever seen.

Each row's real tokens stay contiguous at the right of the cache and every row advances one token per
step, so the 2-D attention mask (rows, width) is zeros then ones, and positions are counted per row from
its first real token, as `generate` does: a row's tokens are what it would get alone (greedy: identical up
to float rounding). Per-row adapters come from `row_adapters` (the batched mixed-adapter path of
`lorakit.layers.mixed`); one block stays open while the set of rows is unchanged, so layers check their
stacked factors once per set, not at every token.

Everything here runs on the server's single model thread.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.layers import row_adapters
from lorakit.model import PeftModel
from lorakit.serve.engine import Failed, PromptLogprobs, Row, TextTracker
from lorakit.serve.sampling import pick_tokens, token_logprobs

log = logging.getLogger("lorakit.serve")


@dataclass(frozen=True)
class StepReport:
    """What one step did, for the scheduler's bookkeeping and metrics."""

    rows: tuple[Row, ...]  # the rows still running after the step
    left: tuple[Row, ...]  # the rows that finished, failed or were cancelled in it
    prefill_tokens: int
    decoded_rows: int


class Batch:
    """The rows being generated and their KV cache."""

    def __init__(self, tokenizer, pad_id: int, eos_ids: set[int]) -> None:
        self.tracker = TextTracker(tokenizer, eos_ids)
        self.pad_id = pad_id
        self.rows: list[Row] = []
        self.cache = None  # DynamicCache over self.rows
        self.mask: Tensor | None = None  # (rows, width) 1 for real tokens
        self.positions: Tensor | None = None  # (rows, 1) position of the last token in the cache
        self.pending: Tensor | None = None  # (rows,) each row's newest token, not yet in the cache
        self._block = ExitStack()
        self._block_rows: list[Row] | None = None

    def step(self, model: nn.Module, newcomers: Sequence[Row]) -> StepReport:
        """One decoding step for the running rows, then the prefill of `newcomers`, who join the batch."""
        before = list(self.rows)
        for row in before:
            if row.cancelled and not row.done:
                row.finish("cancelled")
        self._drop_done()
        decoded = len(self.rows)
        if self.rows:
            try:
                self._decode(model)
            except Exception as err:  # the shared cache may be half-updated: every running row fails
                log.exception("decoding step failed for %d rows", len(self.rows))
                self._fail(self.rows, err)
        self._drop_done()  # before the newcomers join: the rows that just finished are not copied along
        joining = [row for row in newcomers if not row.cancelled]
        if joining:
            try:
                self._prefill(model, joining)
            except Exception as err:  # the running rows' cache is untouched: only the newcomers fail
                log.exception("prefill failed for %d rows", len(joining))
                self._fail(joining, err)
        self._drop_done()
        # Newcomers cancelled before the step never ran: they end here. One cancelled while it joined (its
        # client leaves on the first token) is running now and ends at the next step like any running row;
        # ending it here would leave a finished row in the batch, reported again by the next step.
        joined = {id(row) for row in joining}
        for row in newcomers:
            if id(row) not in joined and not row.done:
                row.finish("cancelled")
        gone = [row for row in [*before, *newcomers] if row.done]
        return StepReport(tuple(self.rows), tuple(gone), sum(len(r.prompt_ids) for r in joining), decoded)

    def abort(self, err: Exception, newcomers: Sequence[Row]) -> StepReport:
        """Fail every running row and `newcomers`, and start over empty (after an error outside any one row's
        handling)."""
        rows = [*self.rows, *newcomers]
        self._fail(rows, err)
        self._drop_done()
        self.close()
        return StepReport((), tuple(rows), 0, 0)

    def close(self) -> None:
        """Leave the row_adapters() block (before adapters change, and at shutdown)."""
        self._block.close()
        self._block_rows = None

    # ---- the two kinds of forward ----------------------------------------------------------------

    def _decode(self, model: nn.Module) -> None:
        assert self.mask is not None and self.positions is not None and self.pending is not None
        mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        positions = self.positions + 1
        self._enter_block(model)
        logits = _forward(model, self.pending[:, None], mask, positions, self.cache, all_logits=False)[:, -1]
        self.mask, self.positions = mask, positions
        self.pending = self._pick(logits, self.rows)

    def _prefill(self, model: nn.Module, rows: list[Row]) -> None:
        from transformers import DynamicCache

        device = _device(model)
        for row in rows:
            row.seed_generator(device)
        # Rows with the same prompt and adapter (GRPO's G samples of a prompt, repeated requests) share one
        # prefill: each distinct prompt runs once, and its cache and logits are repeated for its rows.
        distinct: dict[tuple, int] = {}
        source = [distinct.setdefault((r.adapter, *r.prompt_ids), len(distinct)) for r in rows]
        firsts = [rows[source.index(i)] for i in range(len(distinct))]
        width = max(len(r.prompt_ids) for r in firsts)
        ids = torch.full((len(firsts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(firsts), width), dtype=torch.long)
        for i, row in enumerate(firsts):
            ids[i, width - len(row.prompt_ids):] = torch.tensor(row.prompt_ids)
            mask[i, width - len(row.prompt_ids):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()  # plain full-attention layers, whatever the config: they can be concatenated
        echo = any(row.prompt_logprobs for row in rows)
        with row_adapters([r.adapter for r in firsts]) if isinstance(model, PeftModel) else ExitStack():
            logits = _forward(model, ids, mask, positions, cache, all_logits=echo)
        if len(firsts) < len(rows):
            index = torch.tensor(source, device=device)
            cache.batch_select_indices(index)
            logits, mask, positions = logits[index], mask[index], positions[index]
        for i, row in enumerate(rows):
            if row.prompt_logprobs:
                row.emit(_prompt_logprobs(logits[i, width - len(row.prompt_ids):], row))
        pending = self._pick(logits[:, -1], rows, first=True)
        self._join(rows, cache, mask, positions[:, -1:], pending)

    # ---- tokens ----------------------------------------------------------------------------------

    def _pick(self, logits: Tensor, rows: list[Row], first: bool = False) -> Tensor:
        """Choose each row's next token and push it to the row; rows that fail here fail alone."""
        tokens = pick_tokens(logits, [r.temperature for r in rows], [r.top_p for r in rows],
                             [r.generator for r in rows])
        wanted = [i for i, r in enumerate(rows) if r.logprobs is not None and r.max_tokens > 0]
        infos = dict.fromkeys(range(len(rows)))
        if wanted:
            index = torch.tensor(wanted, device=logits.device)
            top = max(rows[i].logprobs or 0 for i in wanted)
            for i, info in zip(wanted, token_logprobs(logits[index], tokens[index], top)):
                infos[i] = info if top == rows[i].logprobs else _fewer(info, rows[i].logprobs or 0)
        for i, (row, token) in enumerate(zip(rows, tokens.tolist())):
            try:
                if row.cancelled:
                    row.finish("cancelled")
                elif first and row.max_tokens == 0:
                    row.finish("length")
                else:
                    self.tracker.push(row, token, infos[i])
            except Exception as err:  # a row whose text handling fails ends alone
                log.exception("row failed")
                self._fail([row], err)
        return tokens

    def _fail(self, rows: Sequence[Row], err: Exception) -> None:
        for row in rows:
            if not row.done:
                row.done, row.finish_reason = True, "error"
                row.emit(Failed(err))

    # ---- the cache changing shape ----------------------------------------------------------------

    def _join(self, rows: list[Row], cache, mask: Tensor, positions: Tensor, pending: Tensor) -> None:
        keep = [i for i, row in enumerate(rows) if not row.done]
        if not keep:
            return
        if len(keep) < len(rows):
            index = torch.tensor(keep, device=mask.device)
            cache.batch_select_indices(index)
            mask, positions, pending = mask[index], positions[index], pending[index]
        rows = [rows[i] for i in keep]
        if not self.rows:
            self.rows, self.cache, self.mask = rows, cache, mask
            self.positions, self.pending = positions, pending
            return
        assert self.mask is not None and self.positions is not None and self.pending is not None
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, width, -2), _pad_left(theirs.keys, width, -2)])
            mine.values = torch.cat([_pad_left(mine.values, width, -2), _pad_left(theirs.values, width, -2)])
        self.mask = torch.cat([_pad_left(self.mask, width, -1), _pad_left(mask, width, -1)])
        self.positions = torch.cat([self.positions, positions])
        self.pending = torch.cat([self.pending, pending])
        self.rows = self.rows + rows

    def _drop_done(self) -> None:
        keep = [i for i, row in enumerate(self.rows) if not row.done]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.cache, self.mask, self.positions, self.pending = [], None, None, None, None
            return
        assert self.mask is not None and self.positions is not None and self.pending is not None
        index = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.positions, self.pending = self.mask[index], self.positions[index], self.pending[index]
        self.rows = [self.rows[i] for i in keep]
        lead = int(self.mask.any(dim=0).long().argmax())  # columns that are padding in every live row
        if lead:
            self.mask = self.mask[:, lead:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., lead:, :], layer.values[..., lead:, :]

    def _enter_block(self, model: nn.Module) -> None:
        if isinstance(model, PeftModel) and self._block_rows != self.rows:
            self._block.close()
            self._block.enter_context(row_adapters([r.adapter for r in self.rows]))
            self._block_rows = list(self.rows)


def _forward(model: nn.Module, ids: Tensor, mask: Tensor, positions: Tensor, cache,
             all_logits: bool) -> Tensor:
    """Logits (rows, positions kept, vocab) of one forward with the KV cache."""
    target = model.get_base_model() if isinstance(model, PeftModel) else model
    accepts = inspect.signature(target.forward).parameters
    # transformers 5 renames past_key_values to cache, model by model; only the last position's logits are
    # needed for decoding, but not every model's forward takes logits_to_keep.
    cache_kwarg = "cache" if "cache" in accepts else "past_key_values"
    keep = {"logits_to_keep": 0 if all_logits else 1} if "logits_to_keep" in accepts else {}
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                 **{cache_kwarg: cache}, **keep).logits


def _prompt_logprobs(logits: Tensor, row: Row) -> PromptLogprobs:
    """Logprobs of prompt tokens 1.. from the logits at positions 0.. (`logits`: the row's real positions)."""
    ids = torch.tensor(row.prompt_ids[1:], device=logits.device)
    return PromptLogprobs(tuple(token_logprobs(logits[:-1], ids, row.logprobs or 0)) if len(ids) else ())


def _fewer(info, top: int):
    return type(info)(info.token, info.logprob, info.top[:top])


def _pad_left(tensor: Tensor, width: int, dim: int) -> Tensor:
    """`tensor` left-padded with zeros along `dim` (-1 or -2) to `width`."""
    missing = width - tensor.shape[dim]
    if not missing:
        return tensor
    return F.pad(tensor, (missing, 0) if dim == -1 else (0, 0, missing, 0))


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
