"""TRL's DPOTrainer training a lorakit adapter without a second copy of the base model.

TRL recognises adapter models only by `isinstance(model, peft.PeftModel)`, so for a lorakit model it never
takes its "disable the adapter for the reference" path. Handed the adapted transformers model
(`get_base_model()`, see docs/trl.md for why not the PeftModel itself) with `ref_model=None`, TRL 1.16:

- with `precompute_ref_log_probs=True` computes the reference log-probs once, with the model it was given,
  before any step. A fresh LoRA adapter is the identity, so that is the base model, and no reference model
  is kept (`trainer.ref_model is None`): the same saving as `lorakit dpo --precompute-ref`.
- without it, loads a second full model from `model.config._name_or_path` as the reference (pinned below),
  which is the copy lorakit avoids.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.train.preference_data import bundled_preference_path

trl = pytest.importorskip("trl")


def _conversational_pairs(count: int):
    """The bundled pairs in TRL's conversational form: answers as assistant message lists."""
    from datasets import Dataset

    rows = [json.loads(line) for line in bundled_preference_path("train").read_text().splitlines()[:count]]
    return Dataset.from_list(
        [
            {
                "prompt": r["prompt"],
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}],
            }
            for r in rows
        ]
    )


def _adapted(model_dir) -> lorakit.PeftModel:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                task_type="CAUSAL_LM")
    return lorakit.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config)


def _args(tmp_path, **overrides):
    options = dict(
        output_dir=str(tmp_path / "trl"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        seed=0,
        max_length=128,
        gradient_checkpointing=False,
    )
    options.update(overrides)
    return trl.DPOConfig(**options)


def test_dpo_trainer_with_precomputed_reference_trains_only_the_adapter(
    tmp_path, tiny_chat_model_dir
) -> None:
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    model = _adapted(tiny_chat_model_dir)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = trl.DPOTrainer(
        model=model.get_base_model(),
        ref_model=None,
        train_dataset=_conversational_pairs(12),
        processing_class=tokenizer,
        args=_args(tmp_path, precompute_ref_log_probs=True),
    )
    assert trainer.ref_model is None, "no reference model is kept: no copy of the base"
    assert len(trainer.train_dataset["ref_chosen_logps"]) == 12
    trainer.train()

    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3 and all(torch.isfinite(torch.tensor(e["loss"])) for e in logged)
    assert logged[0]["loss"] == pytest.approx(0.6931, abs=1e-3), (
        "the first step's policy is the precomputed reference"
    )
    after = dict(model.named_parameters())
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    adapter = {name for name, p in after.items() if p.requires_grad}
    assert adapter and all(".lora_A." in name or ".lora_B." in name for name in adapter)
    assert changed and changed <= adapter, "only adapter weights change"
    assert any(".lora_B." in name for name in changed)

    # The adapter saves in PEFT's format; PEFT loads it and computes the same logits.
    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    reference = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir), tmp_path / "adapter"
    )
    batch = tokenizer(["October 16, 1983", "Feb 1 1976 is a date"], return_tensors="pt", padding=True)
    model.eval()
    reference.eval()
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, reference(**batch).logits, atol=1e-5, rtol=0)


def test_without_precompute_trl_loads_a_second_full_model_as_reference(tmp_path, tiny_chat_model_dir) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    model = _adapted(tiny_chat_model_dir)
    trainer = trl.DPOTrainer(
        model=model.get_base_model(),
        ref_model=None,
        train_dataset=_conversational_pairs(4),
        processing_class=tokenizer,
        args=_args(tmp_path),
    )
    # Not a PEFT model to TRL (accelerate's is_peft_model is an isinstance check against peft.PeftModel), so
    # it
    # loads the reference from the policy's config path: a full copy of the base weights, without the adapter.
    assert trainer.ref_model is not None and trainer.ref_model is not trainer.model
    own = sum(p.numel() for p in model.get_base_model().parameters() if not p.requires_grad)
    assert sum(p.numel() for p in trainer.ref_model.parameters()) == own
