"""The GRPO objective's maths: group-normalised advantages and the clipped policy-ratio loss per token.

Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300, §4.1) samples G
completions o_1..o_G for each prompt q, scores them with rewards r_1..r_G and gives every token of o_i
the advantage of its completion within its group:

    A_i = (r_i − mean(r)) / (std(r) + ε_std)        std with Bessel's correction, ε_std = 1e-4

Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv:2503.20783) drops the division
by std (A_i = r_i − mean(r)): it weights easy and hard questions alike.

Per completion token t, with ρ = πθ(o_t | q, o_<t) / π_old(o_t | q, o_<t) (π_old: the policy that
sampled, equal to πθ on the first of the μ passes) and the KL estimate to the reference (Schulman's k3)

    ℓ_t = −min(ρ·A_i, clip(ρ, 1 − ε_low, 1 + ε_high)·A_i) + β·(exp(r_t) − r_t − 1),  r_t = log π_ref − log πθ

ε_high > ε_low is DAPO's "clip-higher". The per-token terms are reduced according to the loss type:

    grpo      (1/n) Σ_i (1/|o_i|) Σ_t ℓ_it          each completion's mean, then the mean over completions
    dr_grpo   (1/(n·L)) Σ_i Σ_t ℓ_it               a constant L = the maximum completion length
    dapo      (1/Σ_i |o_i|) Σ_i Σ_t ℓ_it            token-level (Yu et al. 2025, DAPO, arXiv:2503.14476,
                                                   eq. 8)

Zero-variance groups (every completion got the same reward) carry no learning signal: their advantages
are exactly 0 for every loss type (so only the KL term moves them). DAPO's dynamic sampling drops them
from the batch: with `dapo` their completions are left out of the loss and of its token count; the
others keep them, as their papers do. Either way they are counted.

Everything here works on the completion tokens of a micro-batch laid out flat (row-major), with
`rows[k]` the completion that token k belongs to; the loss is returned as a *sum* with the count it is
to be divided by, so that the Trainer can normalise over a whole accumulation window (train/objective.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
STD_EPSILON = 1e-4


def group_advantages(rewards: Tensor, group_size: int, scale: bool = True) -> tuple[Tensor, Tensor]:
    """(advantage per completion (n,), zero-variance flag per group (n / group_size,)).

    `rewards` (n,) holds consecutive groups of `group_size` completions of one prompt. `scale`: divide by
    the group's std (GRPO, DAPO) or not (Dr. GRPO). A group whose rewards are all equal gets exactly 0.
    """
    grouped = rewards.reshape(-1, group_size).to(torch.float64)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(dim=1, keepdim=True) + STD_EPSILON)
    zero = (grouped == grouped[:, :1]).all(dim=1)
    # Equal rewards can leave a rounding residue in r − mean: the papers' advantage is exactly zero.
    advantages = torch.where(zero[:, None], torch.zeros_like(centred), centred)
    return advantages.reshape(-1).to(rewards.dtype), zero


@dataclass(frozen=True)
class ClippedObjective:
    """The clipped-ratio loss with an optional KL penalty; see the module docstring for the formulas."""

    loss_type: str = "grpo"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.0
    max_completion_length: int = 256

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type: expected {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")

    @property
    def scale_rewards(self) -> bool:
        """Whether advantages are divided by the group's std (not in Dr. GRPO)."""
        return self.loss_type != "dr_grpo"

    def token_losses(self, logps: Tensor, old_logps: Tensor, advantages: Tensor,
                     ref_logps: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """(ℓ_t per token, whether clipping took the token's gradient away, KL estimate per token or None).

        All arguments are per completion token (k,), `advantages` already broadcast to the tokens.
        """
        ratio = torch.exp(logps - old_logps)
        clipped_ratio = ratio.clamp(1 - self.epsilon_low, 1 + self.epsilon_high)
        unclipped, clipped = ratio * advantages, clipped_ratio * advantages
        losses = -torch.min(unclipped, clipped)
        was_clipped = (clipped < unclipped).detach()
        kl = None
        if ref_logps is not None:
            delta = ref_logps - logps
            kl = torch.exp(delta) - delta - 1
            if self.beta:
                losses = losses + self.beta * kl
        return losses, was_clipped, kl

    def count(self, lengths: Tensor, keep: Tensor) -> int:
        """What the summed loss of completions with `lengths` (n,) tokens is divided by; `keep` (n,) marks
        the completions in the loss (all but dapo's zero-variance groups)."""
        if self.loss_type == "grpo":
            return int(lengths.numel())
        if self.loss_type == "dr_grpo":
            return int(lengths.numel()) * self.max_completion_length
        return int(lengths[keep].sum())

    def reduce(self, losses: Tensor, rows: Tensor, lengths: Tensor, keep: Tensor) -> Tensor:
        """The loss summed as the loss type says (to be divided by `count`): `losses` per token (k,),
        `rows` (k,) the completion of each token, `lengths` (n,) tokens per completion, `keep` (n,)."""
        if self.loss_type == "grpo":
            per_row = torch.zeros(lengths.shape, dtype=losses.dtype, device=losses.device).index_add(
                0, rows, losses
            )
            return (per_row / lengths.clamp(min=1).to(losses.dtype)).sum()
        if self.loss_type == "dr_grpo":
            return losses.sum()
        return (losses * keep[rows].to(losses.dtype)).sum()

    def kept(self, zero_groups: Tensor, group_size: int) -> Tensor:
        """(n,) True for the completions in the loss: all of them, or with dapo those of groups whose
        rewards differ (DAPO's dynamic sampling, without refilling the batch)."""
        if self.loss_type != "dapo":
            return torch.ones(zero_groups.numel() * group_size, dtype=torch.bool, device=zero_groups.device)
        return (~zero_groups).repeat_interleave(group_size)

    def loss(self, logps: Tensor, old_logps: Tensor | None, ref_logps: Tensor | None, advantages: Tensor,
             rows: Tensor, lengths: Tensor, keep: Tensor) -> tuple[Tensor, dict[str, float]]:
        """(summed loss, figures) of one micro-batch: per-token `logps` (k,) of πθ (with gradients), of
        π_old (None: πθ itself, detached, as on the first of the μ passes) and of π_ref (None: no KL);
        `advantages` (n,) per completion. Figures: the share of kept tokens whose ratio was clipped and,
        with a reference, the mean KL estimate per token."""
        old = logps.detach() if old_logps is None else old_logps
        losses, clipped, kl = self.token_losses(logps, old, advantages[rows].to(logps.dtype), ref_logps)
        token_kept = keep[rows]
        figures = {"clip_ratio": clipped[token_kept].float().mean().item() if token_kept.any() else 0.0}
        if kl is not None:
            figures["kl"] = kl.detach().mean().item()
        return self.reduce(losses, rows, lengths, keep), figures
