"""Prefix sharing (`lorakit.train.shared_prefix`): the common prompt prefix runs once, and the loss and
gradients equal the straightforward forward for every architecture it is enabled for."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_gpt2, tiny_llama, tiny_model

import lorakit
import lorakit.train.shared_prefix as shared_prefix
from lorakit.train.loss import causal_lm_loss, supervised_token_nll
from lorakit.train.shared_prefix import ARCHITECTURES, can_share_prefix, shared_prefix_length

# Beyond tiny_model's sizes: GPT-2 without its default dropout (these models train), Gemma's head size.
CONFIGS = {"gpt2": {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}, "gemma": {"head_dim": 8}}


def _model(model_type: str, dropout: float = 0.0, **config_overrides) -> torch.nn.Module:
    base = tiny_model(model_type, **{**CONFIGS.get(model_type, {}), **config_overrides})
    model = lorakit.get_peft_model(
        base,
        lorakit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, lora_dropout=dropout),
    )
    return model.train()


def _batch(
    prefix: int = 20, rows: int = 3, length: int = 30
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows sharing `prefix` tokens; the last row is right-padded; labels on the tokens after the prompt."""
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 96, (rows, length), generator=gen)
    ids[:, :prefix] = ids[0, :prefix]
    mask = torch.ones_like(ids)
    mask[-1, length - 4:] = 0
    ids[-1, length - 4:] = 0
    labels = torch.where(mask.bool(), ids, -100)
    labels[:, :prefix - 2] = -100
    return ids, mask, labels


@pytest.fixture
def tiny_costs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny batches never pay for an extra pass on a real CPU; here every saved position counts."""
    monkeypatch.setattr(shared_prefix, "EFFICIENT_TOKENS", 1)


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record what `can_share_prefix` decided for each forward."""
    decisions: list[int] = []
    real = shared_prefix.can_share_prefix

    def recording(*args):
        decisions.append(real(*args))
        return decisions[-1]

    monkeypatch.setattr(shared_prefix, "can_share_prefix", recording)
    return decisions


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_shared_prefix_equals_the_straightforward_loss_and_gradients(
    model_type: str, monkeypatch, tiny_costs
) -> None:
    model = _model(model_type)
    ids, mask, labels = _batch()
    params = [p for p in model.parameters() if p.requires_grad]

    expected = supervised_token_nll(model, ids, mask, labels, share_prefix=False)
    expected_grads = torch.autograd.grad(expected.sum(), params)
    decisions = _spy(monkeypatch)
    got = supervised_token_nll(model, ids, mask, labels)
    got_grads = torch.autograd.grad(got.sum(), params)

    assert decisions == [20]
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    for a, b in zip(got_grads, expected_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("model_type", "window"), [
    ("mistral", {"sliding_window": 8}),
    ("qwen2", {"sliding_window": 8, "use_sliding_window": True, "max_window_layers": 0}),
])
def test_sliding_window_shorter_than_the_prefix(
    model_type: str, window: dict, monkeypatch, tiny_costs
) -> None:
    """The cache keeps only the window of the prefix; the rest of each row must still see the same keys."""
    model = _model(model_type, **window)
    ids, mask, labels = _batch()
    expected = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    decisions = _spy(monkeypatch)
    total, count = causal_lm_loss(model, ids, mask, labels)
    assert decisions == [20]
    assert torch.allclose(total / count, expected, atol=1e-5, rtol=0)


def test_shared_prefix_loss_equals_hf_loss_and_saves_work(monkeypatch, tiny_costs) -> None:
    """Against transformers' own `labels=` loss, and the decoder sees the prefix once plus the rest of each
    row."""
    model = _model("llama")
    ids, mask, labels = _batch(prefix=20, rows=4)
    expected = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    seen: list[tuple[int, int]] = []
    decoder = model.get_base_model().get_decoder()
    handle = decoder.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    total, count = causal_lm_loss(model, ids, mask, labels)
    handle.remove()
    assert seen == [(1, 20), (4, 10)]
    assert torch.allclose(total / count, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("ids", "expected"), [
    (torch.tensor([[5, 6, 7, 8], [5, 6, 9, 8]]), 2),
    (torch.tensor([[5, 6, 7, 8], [4, 6, 7, 8]]), 0),
    (torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8]]), 3),  # identical rows still keep one token each to run
    (torch.tensor([[5, 6, 7, 8]]), 3),
])
def test_shared_prefix_length(ids: torch.Tensor, expected: int) -> None:
    assert shared_prefix_length(ids) == expected


@pytest.mark.parametrize(("rows", "length", "prefix", "pays"), [
    (8, 64, 4, False),    # measured step ratio 1.18
    (8, 64, 16, False),   # 1.01: break-even
    (8, 64, 32, True),    # 0.79
    (2, 128, 96, False),  # 1.00: two rows split into two small passes
    (16, 64, 24, True),   # 0.70
    (8, 67, 36, True),    # the bundled chat rows
    (3, 30, 20, False),   # a tiny batch: the extra pass costs more than it saves
])
def test_sharing_only_where_the_measured_cost_model_predicts_a_gain(rows: int, length: int, prefix: int,
                                                                    pays: bool) -> None:
    ids = torch.randint(3, 96, (rows, length))
    ids[:, :prefix] = 1
    ids[:, prefix] = torch.arange(rows) + 2  # the rows differ right after the prefix
    model = tiny_llama().train()
    assert can_share_prefix(model, model.get_decoder(), ids) == (prefix if pays else 0)


def test_not_shared_when_it_would_change_the_result(tiny_costs) -> None:
    ids, _, _ = _batch(prefix=20)
    model = _model("llama")
    decoder = model.get_base_model().get_decoder()
    assert can_share_prefix(model.get_base_model(), decoder, ids) == 20
    assert can_share_prefix(model.get_base_model(), decoder, ids[:1]) == 0, "one row: nothing to share"

    dropped = _model("llama", dropout=0.1)
    assert can_share_prefix(dropped.get_base_model(), dropped.get_base_model().get_decoder(), ids) == 0
    assert (
        can_share_prefix(dropped.get_base_model().eval(), dropped.get_base_model().get_decoder(), ids) == 20
    )

    gpt2 = tiny_gpt2().train()  # GPT-2's default residual/attention dropout is 0.1
    assert can_share_prefix(gpt2, gpt2.get_decoder(), ids) == 0

    checkpointed = tiny_llama().train()
    checkpointed.gradient_checkpointing_enable()
    assert can_share_prefix(checkpointed, checkpointed.get_decoder(), ids) == 0


def test_masked_or_left_padded_batches_are_not_shared(monkeypatch, tiny_costs) -> None:
    model = _model("llama")
    ids, mask, labels = _batch()
    left = torch.ones_like(mask)
    left[-1, :2] = 0
    decisions = _spy(monkeypatch)
    expected = model(input_ids=ids, attention_mask=left, labels=torch.where(left.bool(), labels, -100)).loss
    total, count = causal_lm_loss(model, ids, left, torch.where(left.bool(), labels, -100))
    assert decisions == []
    assert torch.allclose(total / count, expected, atol=1e-5, rtol=0)


def test_mixed_adapter_rows_are_not_shared(monkeypatch, tiny_costs) -> None:
    """Rows on different adapters have different prefix hidden states (DPO's one-pass reference is such a
    batch)."""
    from lorakit.layers.rows import BASE_ROW, row_adapters

    model = _model("llama")
    ids, mask, labels = _batch()
    decisions = _spy(monkeypatch)
    with torch.no_grad(), row_adapters(["default", BASE_ROW, "default"]):
        mixed = supervised_token_nll(model, ids, mask, labels)
    with torch.no_grad(), model.disable_adapter():
        base_row = supervised_token_nll(model, ids[1:2], mask[1:2], labels[1:2])
    assert decisions == [0, 0]  # the mixed batch, then the single base row
    row_of = (labels[:, 1:] != -100).nonzero()[:, 0]
    assert torch.allclose(mixed[row_of == 1], base_row, atol=1e-5, rtol=0)
