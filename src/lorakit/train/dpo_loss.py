"""The DPO objective: the loss on sequence log-probabilities, and the module that computes it on batches.

For a prompt x with preferred answer y_w and dispreferred answer y_l, the policy πθ and the reference
π_ref give the log-ratio margin

    h = (log πθ(y_w|x) − log π_ref(y_w|x)) − (log πθ(y_l|x) − log π_ref(y_l|x))

where log π(y|x) is summed over the answer's tokens only. The losses (per pair):

    sigmoid  L = −(1−ε)·log σ(β·h) − ε·log σ(−β·h)        DPO: Rafailov et al. 2023, arXiv:2305.18290, eq. 7
    ipo      L = (h − 1/(2β))²                            IPO: Azar et al. 2023, arXiv:2310.12036, eq. 17

ε is label smoothing: the assumed probability that a pair's preference is flipped (the "conservative DPO"
of Mitchell 2023, "A note on DPO with noisy preferences"); ε = 0 is the paper's loss. IPO's β is the
paper's τ: the loss pulls h towards 1/(2β) instead of pushing it to infinity, which is what keeps IPO from
overfitting deterministic preferences. IPO is applied to the summed log-probs, as the paper writes it.

The implicit rewards r = β·(log πθ(y|x) − log π_ref(y|x)) (DPO §5) are reported: reward accuracy (the
share of pairs with r_w > r_l) and the margin r_w − r_l should rise during training.

The reference costs no extra copy of the model: π_ref is the policy's own base with the adapter switched
off (`PeftModel.disable_adapter()`), or, when training continues from an adapter, that starting adapter
kept frozen under another name and selected for the reference pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.layers import row_adapters
from lorakit.model import PeftModel
from lorakit.train.loss import IGNORE_INDEX, supervised_token_nll
from lorakit.train.preference_data import collate_pairs

LOSS_TYPES = ("sigmoid", "ipo")


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """(per-pair losses, chosen rewards, rejected rewards) from per-pair sequence log-probabilities.

    The formulas are in the module docstring. Rewards are detached: they are measurements, not part of
    the objective.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type: expected {' or '.join(LOSS_TYPES)}, got {loss_type!r}")
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    margin = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        # logsigmoid rather than log(sigmoid(.)): exact for large |β·h| where sigmoid rounds to 0 or 1.
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(
            -beta * margin
        )
    else:
        losses = (margin - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def reward_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict[str, float]:
    """Means over the pairs: reward accuracy (ties count as wrong), margin, chosen and rejected rewards."""
    return {
        "reward_accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
        "reward_margin": (chosen_rewards - rejected_rewards).mean().item(),
        "chosen_reward": chosen_rewards.mean().item(),
        "rejected_reward": rejected_rewards.mean().item(),
    }


def sequence_logps(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                   chunk_size: int = 1024) -> Tensor:
    """log π(y|x) per row: Σ_t log π(y_t | x, y_<t) over the labelled (answer) tokens only, shape (rows,).

    The per-token values come from `supervised_token_nll`, which runs the LM head on the answer positions
    alone; they are summed back into their rows.
    """
    nll = supervised_token_nll(model, input_ids, attention_mask, labels, chunk_size=chunk_size)
    rows = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)[0]
    return -torch.zeros(labels.shape[0], device=nll.device, dtype=nll.dtype).index_add(0, rows, nll)


@contextmanager
def reference_mode(model: PeftModel, rows: int, adapter: str | None = None) -> Iterator[None]:
    """Inside the block `model` computes π_ref for a batch of `rows` rows, without gradients.

    adapter None: every adapter off, the base model. Otherwise the named (frozen) adapter alone, selected
    per row (`row_adapters`) so the trained adapter's active/trainable state is never touched. Dropout is
    off too: the reference is a fixed function, the same in every step.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), model.disable_adapter() if adapter is None else row_adapters([adapter] * rows):
            yield
    finally:
        model.train(was_training)


class PreferenceLoss:
    """DPO/IPO losses of preference pairs for a policy (a PeftModel) and its reference.

    Takes the batches of `preference_data.collate_pairs`: (pairs, 2, length), side 0 chosen. Both sides go
    through the policy in one forward pass; the reference log-probs come from `ref_logps` when they were
    precomputed, else from a no-grad pass in `reference_mode` (`reference_adapter`: see there).
    """

    def __init__(
        self,
        model: PeftModel,
        beta: float,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        reference_adapter: str | None = None,
        chunk_size: int = 1024,
    ) -> None:
        self.model = model
        self.beta = beta
        self.loss_type = loss_type
        self.label_smoothing = label_smoothing
        self.reference_adapter = reference_adapter
        self.chunk_size = chunk_size

    def sequence_logps(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        """log π(answer | prompt) per row of 2-D inputs (see the function `sequence_logps`)."""
        return sequence_logps(self.model, input_ids, attention_mask, labels, self.chunk_size)

    def reference_logps(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        """log π_ref of both sides, (pairs, 2)."""
        pairs = input_ids.shape[0]
        with reference_mode(self.model, 2 * pairs, self.reference_adapter):
            logps = self.sequence_logps(
                *(t.reshape(2 * pairs, -1) for t in (input_ids, attention_mask, labels))
            )
        return logps.view(pairs, 2)

    def pair_losses(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                    ref_logps: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(losses, chosen rewards, rejected rewards), one value per pair."""
        pairs = input_ids.shape[0]
        flat = [t.reshape(2 * pairs, -1) for t in (input_ids, attention_mask, labels)]
        policy = self.sequence_logps(*flat).view(pairs, 2)
        if ref_logps is None:
            ref_logps = self.reference_logps(input_ids, attention_mask, labels)
        ref_logps = ref_logps.to(policy.dtype)
        return dpo_loss(
            policy[:, 0],
            policy[:, 1],
            ref_logps[:, 0],
            ref_logps[:, 1],
            self.beta,
            self.loss_type,
            self.label_smoothing,
        )


def _batches(examples: Sequence[dict[str, Any]], batch_size: int, pad_token_id: int | None,
             device: torch.device) -> Iterator[tuple[list[dict[str, Any]], dict[str, Tensor]]]:
    """Length-sorted batches (less padding) of `examples`, with the examples each holds."""
    order = sorted(range(len(examples)), key=lambda i: examples[i]["length"])
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start:start + batch_size]]
        yield chunk, {k: v.to(device) for k, v in collate_pairs(chunk, pad_token_id).items()}


@torch.no_grad()
def precompute_reference(loss: PreferenceLoss, examples: Sequence[dict[str, Any]], batch_size: int,
                         pad_token_id: int | None, device: torch.device) -> None:
    """Store π_ref's log-probs in each example as `ref_logps` = (chosen, rejected), computed once before
    training, so that no step needs a reference pass (one forward per pair instead of two)."""
    for chunk, batch in _batches(examples, batch_size, pad_token_id, device):
        batch.pop("ref_logps", None)
        logps = loss.reference_logps(**batch).double().cpu().tolist()
        for example, pair in zip(chunk, logps):
            example["ref_logps"] = pair


@torch.no_grad()
def evaluate_preferences(loss: PreferenceLoss, examples: Sequence[dict[str, Any]], batch_size: int,
                         pad_token_id: int | None, device: torch.device,
                         reduce: Callable[[Tensor], Tensor] | None = None) -> dict[str, float]:
    """Mean DPO loss and reward metrics over `examples` (summed over processes by `reduce` if given)."""
    was_training = loss.model.training
    loss.model.eval()
    # loss, correct, margin, chosen reward, rejected reward, pairs
    sums = torch.zeros(6, device=device, dtype=torch.float64)
    for _, batch in _batches(examples, batch_size, pad_token_id, device):
        losses, chosen, rejected = loss.pair_losses(**batch)
        sums += torch.stack([losses.sum(), (chosen > rejected).sum(), (chosen - rejected).sum(), chosen.sum(),
                             rejected.sum(), torch.tensor(float(len(losses)), device=device)]).double()
    if reduce is not None:
        sums = reduce(sums)
    loss.model.train(was_training)
    pairs = sums[5].item()
    means = (sums[:5] / pairs).tolist() if pairs else [math.nan] * 5
    return dict(zip(("loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward"), means))
