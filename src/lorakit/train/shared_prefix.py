"""Run a batch's common prompt prefix once instead of once per row.

Chat data repeats a system prompt and an instruction in every row: the bundled date rows share their
first 36 of ~64 tokens. In a causal decoder the hidden states of those positions depend only on those
tokens, so they are the same in every row. The decoder runs the shared prefix for one row, keeps its
keys and values in a cache, repeats the cache across the batch, and runs only each row's remaining
tokens against it — the "prefix sharing" of Wang et al. 2024 ("Accelerating Direct Preference
Optimization with Prefix Sharing", arXiv:2410.20305), here for SFT and DPO alike. Gradients flow back
through the cached keys and values into the single prefix pass, summed over the rows.

The result equals the straightforward forward up to float rounding (a different matmul shape): loss and
gradients within 1e-5 (tested). It applies only where that holds exactly in exact arithmetic:
- no attention mask and no explicit positions (right-padded rows, see `loss._mask_changes_nothing`);
- no active dropout (a shared pass would share one dropout mask among the rows);
- every row uses the same adapters (not a mixed-adapter batch, as DPO's one-pass reference can be);
- no gradient checkpointing (transformers turns the cache off under it);
- architectures whose decoder takes a cache and `position_ids` (checked by a test for each);
and only where it pays: two smaller passes can cost more than one large one (`_pays`).
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from lorakit.layers.rows import mixed_rows_active

# A decoder pass over n token positions costs about max(n, EFFICIENT_TOKENS) on a CPU: below that many
# rows a matmul runs well under its peak rate. Fitted to measured SFT steps (forward + backward) of
# SmolLM2-135M at 2×128, 4×64, 8×64 and 16×64 tokens with shared prefixes of 4 to 96 tokens: it predicts
# the shared/plain step ratio within ~0.05, e.g. 8×64 with 16 shared tokens breaks even, with 32 it is 0.79.
EFFICIENT_TOKENS = 128
# Share only where the prediction is a clear gain.
MAX_COST_RATIO = 0.9

ARCHITECTURES = {"llama", "mistral", "qwen2", "qwen3", "smollm3", "gpt2", "phi3", "gemma", "olmo", "olmo2",
                 "starcoder2", "stablelm"}


def shared_prefix_length(input_ids: Tensor) -> int:
    """Length of the prefix that every row of `input_ids` (rows, length) starts with, leaving ≥ 1 token per
    row."""
    same = (input_ids == input_ids[:1]).all(dim=0)
    return min(int(same.long().cumprod(0).sum()), input_ids.shape[1] - 1)


def _active_dropout(model: nn.Module) -> bool:
    if not model.training:
        return False
    if float(getattr(model.config, "attention_dropout", 0.0) or 0.0) > 0:
        return True
    return any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())


def _cache_argument(decoder: nn.Module) -> str:
    # transformers renamed `past_key_values` to `cache` during the 5.x series.
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def can_share_prefix(model: nn.Module, decoder: nn.Module, input_ids: Tensor) -> int:
    """The prefix length to share for this batch, or 0 when prefix sharing does not apply.

    `model` is the transformers CausalLM (its dropout modules include the LoRA dropouts), `decoder` its
    base decoder; the batch is right-padded and unmasked, as `decoder_hidden_states` documents.
    """
    rows = input_ids.shape[0]
    if rows < 2 or getattr(model.config, "model_type", None) not in ARCHITECTURES or mixed_rows_active():
        return 0
    if getattr(decoder, "gradient_checkpointing", False) and decoder.training:
        return 0
    prefix = shared_prefix_length(input_ids)
    if not prefix or not _pays(rows, input_ids.shape[1], prefix) or _active_dropout(model):
        return 0
    return prefix


def _pays(rows: int, length: int, prefix: int) -> bool:
    """Whether one pass over the prefix plus one over the rest beats one pass over everything (see above)."""
    def cost(tokens: int) -> int:
        return max(tokens, EFFICIENT_TOKENS)

    return cost(prefix) + cost(rows * (length - prefix)) <= MAX_COST_RATIO * cost(rows * length)


def decoder_hidden_states(model: nn.Module, decoder: nn.Module, input_ids: Tensor) -> Tensor:
    """The decoder's last hidden states (rows, length, hidden) for an unmasked, right-padded batch.

    Same as `decoder(input_ids=input_ids).last_hidden_state`, computing the shared prefix once when
    `can_share_prefix` allows it.
    """
    prefix = can_share_prefix(model, decoder, input_ids)
    if not prefix:
        return decoder(input_ids=input_ids, use_cache=False).last_hidden_state
    rows, length = input_ids.shape
    cache = DynamicCache(config=decoder.config)
    argument = _cache_argument(decoder)
    shared = decoder(input_ids=input_ids[:1, :prefix], use_cache=True, **{argument: cache}).last_hidden_state
    cache.batch_repeat_interleave(rows)
    positions = torch.arange(prefix, length, device=input_ids.device).expand(rows, -1)
    rest = decoder(input_ids=input_ids[:, prefix:], position_ids=positions, use_cache=True,
                   **{argument: cache}).last_hidden_state
    return torch.cat([shared.expand(rows, -1, -1), rest], dim=1)
