"""Weighted combinations of LoRA factors as pure tensor functions (PEFT's `add_weighted_adapter` numerics).

Each input is a term (A, B, c): factors A (r, in) and B (out, r) in PEFT's stored layout, and the coefficient
c = wᵢ · sᵢ (the user's weight times the adapter's scaling), so that the term's update is c · B @ A. Every
function returns the new (A, B) in float32, for an adapter whose scaling is 1:

- `linear`: A = Σ sign(cᵢ)·√|cᵢ| Aᵢ, B = Σ √|cᵢ| Bᵢ (equal ranks). This is not Σ cᵢ BᵢAᵢ: the product
  has cross terms; it is what PEFT computes, so results match theirs.
- `cat`: A = [c₁A₁; c₂A₂; …], B = [B₁, B₂, …], zero-padded to `rank`; exactly Σ cᵢ BᵢAᵢ.
- `svd`: ΔW = Σ cᵢ BᵢAᵢ truncated to `rank` by SVD, B = U_r diag(S_r), A = V_rᵀ, optionally clamped at the
  `clamp` quantile of their entries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

Term = tuple[Tensor, Tensor, float]


def linear(terms: Sequence[Term]) -> tuple[Tensor, Tensor]:
    """(Σ sign(cᵢ)·√|cᵢ| Aᵢ, Σ √|cᵢ| Bᵢ); all Aᵢ of one shape, all Bᵢ of one shape."""
    a_sum = b_sum = 0
    for a, b, coefficient in terms:
        root = math.sqrt(abs(coefficient))
        a_sum = a_sum + math.copysign(root, coefficient) * a.float()
        b_sum = b_sum + root * b.float()
    return a_sum, b_sum


def cat(terms: Sequence[Term], rank: int) -> tuple[Tensor, Tensor]:
    """A (rank, in) = [c₁A₁; c₂A₂; …; 0], B (out, rank) = [B₁, B₂, …, 0]; rank ≥ Σ rᵢ."""
    a = torch.cat([a.float() * coefficient for a, _, coefficient in terms], 0)
    b = torch.cat([b.float() for _, b, _ in terms], 1)
    pad = rank - a.shape[0]
    return F.pad(a, (0, 0, 0, pad)), F.pad(b, (0, pad))


def svd(terms: Sequence[Term], rank: int, clamp: float | None = None, full_matrices: bool = True,
        driver: str | None = None) -> tuple[Tensor, Tensor]:
    """The best rank-`rank` factors of Σ cᵢ BᵢAᵢ: A = V_rᵀ (rank, in), B = U_r diag(S_r) (out, rank)."""
    delta = 0
    for a, b, coefficient in terms:
        delta = delta + coefficient * (b.float() @ a.float())
    u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    u = u[:, :rank] * s[:rank]
    vh = vh[:rank]
    if clamp is not None:
        high = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), clamp)
        u, vh = u.clamp(-high, high), vh.clamp(-high, high)
    return vh, u
