"""A lorakit adapter trained by TRL's SFTTrainer (transformers' Trainer underneath), saved in PEFT's format.

TRL is handed `peft_model.get_base_model()`: the transformers model with lorakit's LoRA layers in place,
whose only trainable parameters are the adapter's (why not the PeftModel itself: docs/trl.md).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import lorakit

trl = pytest.importorskip("trl")


def test_sft_trainer_trains_only_the_adapter_which_saves_in_peft_format(
    tmp_path, tiny_chat_model_dir, demo_subset
) -> None:
    import peft
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    dataset = Dataset.from_list([json.loads(line) for line in demo_subset["train"].read_text().splitlines()])

    def adapted() -> lorakit.PeftModel:
        torch.manual_seed(0)
        config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
        return lorakit.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir), config)

    def sft(model: lorakit.PeftModel, resume: str | None = None):
        args = trl.SFTConfig(
            output_dir=str(tmp_path / ("resumed" if resume else "trl")),
            max_steps=6,
            per_device_train_batch_size=4,
            learning_rate=1e-2,
            logging_steps=1,
            save_steps=3,
            report_to=[],
            use_cpu=True,
            bf16=False,
            seed=0,
        )
        trainer = trl.SFTTrainer(
            model=model.get_base_model(), args=args, train_dataset=dataset, processing_class=tokenizer
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    model = adapted()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = sft(model)

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 6 and losses[-1] < losses[0]
    # Every adapter parameter moved; every base parameter is bit-identical.
    after = dict(model.named_parameters())
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    adapter = {name for name, p in after.items() if p.requires_grad}
    assert adapter and all(".lora_A." in name or ".lora_B." in name for name in adapter)
    assert changed == adapter

    # Trainer's own checkpoints hold the whole adapted model: it resumes from them exactly, and loaded into
    # a fresh lorakit model they give the adapter back (the tied lm_head is not stored).
    resumed = adapted()
    sft(resumed, resume=str(tmp_path / "trl" / "checkpoint-3"))
    assert all(torch.equal(p, after[name]) for name, p in resumed.named_parameters())
    fresh = adapted()
    loaded = fresh.get_base_model().load_state_dict(
        load_file(str(tmp_path / "trl" / "checkpoint-6" / "model.safetensors")), strict=False
    )
    assert loaded.missing_keys == ["lm_head.weight"] and not loaded.unexpected_keys
    assert all(torch.equal(p, after[name]) for name, p in fresh.named_parameters())

    # The adapter in PEFT's format: PEFT loads it and computes the same logits.
    model.save_pretrained(tmp_path / "adapter")
    reference = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir), tmp_path / "adapter"
    )
    model.eval()
    reference.eval()
    batch = tokenizer(["October 16, 1983", "Feb 1 1976 is a date"], return_tensors="pt", padding=True)
    with torch.no_grad():
        ours, theirs = model(**batch).logits, reference(**batch).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir).eval()(**batch).logits
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)
    assert not torch.allclose(base, ours, atol=1e-3)
