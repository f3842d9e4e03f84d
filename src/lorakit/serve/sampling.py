"""The next token of every row of a batch, and log-probabilities, such that no row's numbers can fail another.

Each row has its own temperature T, top-p and seeded generator. The work is row-wise tensor maths over the
(rows, vocab) logits, in float64, with no reduction across rows, so one row's settings or logits (NaN from
an overflowing model, T = 1e-300, top_p = 5e-324) cannot change another row's token:

    z = (logits - max(logits)) / T          z <= 0, the top token exactly 0: no overflow for any T > 0
    p = exp(z)                               unnormalised softmax(logits / T), the top token 1
    keep the smallest head of p (sorted) whose mass reaches top_p · Σp, always the top token
    token = argmax over kept tokens of p / E,  E ~ Exp(1) from the row's generator

The last line is the exponential race (the "Gumbel-max trick" in exponential form): the winner is token i
with probability p_i / Σ p over the kept tokens, the same distribution as `torch.multinomial`, but it
needs no normalised distribution, so it cannot raise "invalid multinomial distribution". Rows with T = 0
take the argmax. Non-finite logits are made finite first (NaN → -inf, +inf → the largest float64).

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
    z = clean[index]
    top = z.max(dim=-1, keepdim=True).values
    temps = torch.tensor([temperature[i] for i in sampled], dtype=torch.float64, device=logits.device)
    p = ((z - top) / temps[:, None]).exp()
    p = p * _top_p_mask(p, [top_p[i] for i in sampled])
    noise = torch.stack([torch.empty(p.shape[-1], dtype=torch.float64, device=p.device)
                         .exponential_(generator=generators[i]) for i in sampled])
    draw = (p / noise).nan_to_num(nan=-1.0).argmax(dim=-1)
    # A row whose logits were all -inf (or NaN) has no distribution to sample: it keeps the argmax.
    finite = torch.isfinite(top[:, 0])
    chosen[index] = torch.where(finite, draw, chosen[index])
    return chosen


def _top_p_mask(p: Tensor, top_p: Sequence[float]) -> Tensor:
    """1.0 for the tokens each row keeps under its top_p (p unnormalised), 0.0 for the others."""
    if all(value >= 1.0 for value in top_p):
        return torch.ones_like(p)
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
