"""The next token of every row of a batch, and log-probabilities, such that no row's numbers can fail another.

Each row has its own temperature T, top-p and seeded generator. The work is row-wise tensor maths over the
(rows, vocab) logits, in float64, with no reduction across rows, so one row's settings or logits (NaN from
an overflowing model, T = 1e-300, top_p = 5e-324) cannot change another row's token:

    z = (logits - max(logits)) / T          z <= 0, the top token exactly 0: no overflow for any T > 0
    p = exp(z)                               unnormalised softmax(logits / T), the top token 1
    keep the smallest head of p (sorted) whose mass reaches top_p · Σp, always the top token
    c = cumsum(p over the kept tokens)       c_last = Σp >= 1
    token = the first i with c_i > u · c_last,  u ~ U[0, 1) from the row's generator

The last line is inverse-CDF sampling: token i wins with probability p_i / Σp over the kept tokens (a
token of zero mass never: c does not rise there), the distribution of `torch.multinomial`, but it needs
no normalised distribution, so it cannot raise "invalid multinomial distribution", and it draws one
number per row rather than one per vocabulary entry. Rows with T = 0 take the argmax. Non-finite logits
are made finite first (NaN → -inf, +inf → the largest float64).

Log-probabilities are those of the model's own distribution, `log_softmax(logits)` without temperature
(as OpenAI and vLLM report them), computed in the logits' dtype like `model(...)` followed by
`torch.log_softmax`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability and the `top` most likely tokens at its position, as (id, logprob)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def pick_tokens(logits: Tensor, temperature: Sequence[float], top_p: Sequence[float],
                generators: Sequence[torch.Generator | None]) -> Tensor:
    """Next token per row of `logits` (rows, vocab): argmax where temperature is 0, else a top-p sample."""
    sampled = [i for i, (t, g) in enumerate(zip(temperature, generators)) if t > 0 and g is not None]
    if not sampled and bool(torch.isfinite(logits).all()):
        # All greedy and finite: the argmax of the float64 copy below is this one (widening is exact), and
        # copying the (rows, vocab) logits is a visible part of a large batch's decoding step on CPU.
        return logits.argmax(dim=-1)
    clean = logits.double().nan_to_num(nan=-torch.inf, posinf=torch.finfo(torch.float64).max)
    chosen = clean.argmax(dim=-1)
    if not sampled:
        return chosen
    index = torch.tensor(sampled, device=logits.device)
    z = clean if len(sampled) == len(clean) else clean[index]
    top = z.max(dim=-1, keepdim=True).values
    temps = torch.tensor([temperature[i] for i in sampled], dtype=torch.float64, device=logits.device)
    p = ((z - top) / temps[:, None]).exp_()
    if any(top_p[i] < 1.0 for i in sampled):
        p *= _top_p_mask(p, [top_p[i] for i in sampled])
    cumulative = p.cumsum(dim=-1)
    total = cumulative[:, -1]
    u = torch.cat([torch.rand(1, dtype=torch.float64, device=p.device, generator=generators[i])
                   for i in sampled])
    # u · c_last can round up to c_last itself; kept below it, the target always falls on a token of mass.
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    draw = torch.searchsorted(cumulative, target[:, None], right=True)[:, 0]
    # A row whose logits were all -inf (or NaN) has no distribution to sample: it keeps the argmax.
    finite = torch.isfinite(top[:, 0])
    chosen[index] = torch.where(finite, draw, chosen[index])
    return chosen


def _top_p_mask(p: Tensor, top_p: Sequence[float]) -> Tensor:
    """1.0 for the tokens each row keeps under its top_p (p unnormalised), 0.0 for the others."""
    limits = torch.tensor(top_p, dtype=torch.float64, device=p.device)[:, None]
    ordered, order = p.sort(dim=-1, descending=True)
    before = ordered.cumsum(dim=-1) - ordered  # mass of the tokens ranked above each token
    # The top token has 0 above it and top_p · Σp >= top_p > 0 (its p is 1): it stays for any top_p.
    outside = before >= limits * ordered.sum(dim=-1, keepdim=True)
    return torch.ones_like(p).scatter(-1, order, (~outside).double())


def token_logprobs(logits: Tensor, tokens: Tensor, top: int) -> list[TokenLogprob]:
    """For each row of `logits` (rows, vocab): the logprob of `tokens[row]` and the `top` best as
    (id, logprob)."""
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = logprobs.gather(-1, tokens[:, None])[:, 0].tolist()
    best = logprobs.topk(top, dim=-1) if top > 0 else None
    return [TokenLogprob(int(token), value, () if best is None else
                         tuple(zip(best.indices[i].tolist(), best.values[i].tolist())))
            for i, (token, value) in enumerate(zip(tokens.tolist(), chosen))]
