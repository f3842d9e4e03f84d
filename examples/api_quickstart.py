"""The Python API end to end, PEFT's names throughout: adapt, train a few steps, save, reload, switch, merge.

    python examples/api_quickstart.py [--model DIR] [--steps 20] [--output runs/api-quickstart]

With no --model it uses the embedded SmolLM2-135M-Instruct. The loop is a plain PyTorch loop on purpose:
any loop (transformers' Trainer, TRL, accelerate) trains a lorakit model the same way.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit import LoraConfig, PeftModel, default_model_path, get_peft_model

PAIRS = [("Normalize this date: 5th of March 2021", "2021-03-05"),
         ("Normalize this date: Dec 24, 1999", "1999-12-24"),
         ("Normalize this date: 1 Jan 2000", "2000-01-01"),
         ("Normalize this date: 07/04/1976 (US)", "1976-07-04")]


def batch(tokenizer) -> dict[str, torch.Tensor]:
    """Chat-formatted rows with the loss on the answers only (labels -100 on the prompt and padding)."""
    rows = []
    for question, answer in PAIRS:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        rows.append((prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {
        "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
        "labels": torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in rows]),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--model", default=None, help="a transformers directory (default: the embedded model)"
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--output", default="runs/api-quickstart")
    args = parser.parse_args()
    model_dir = args.model or str(default_model_path())
    output = Path(args.output)
    torch.manual_seed(0)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.print_trainable_parameters()

    data = batch(tokenizer)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for step in range(1, args.steps + 1):
        loss = model(**data).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 1 or step == args.steps:
            print(f"step {step}: loss {loss.item():.4f}")

    model.save_pretrained(
        output / "adapter"
    )  # PEFT's format: adapter_config.json + adapter_model.safetensors

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    reloaded = PeftModel.from_pretrained(base, output / "adapter").eval()
    question = tokenizer.apply_chat_template(
        [{"role": "user", "content": PAIRS[0][0]}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        adapted = reloaded.generate(**question, max_new_tokens=12, do_sample=False)
        with reloaded.disable_adapter():  # the base model, no copy
            plain = reloaded.generate(**question, max_new_tokens=12, do_sample=False)
    start = question["input_ids"].shape[1]
    print("base   :", tokenizer.decode(plain[0, start:], skip_special_tokens=True).strip())
    print("adapter:", tokenizer.decode(adapted[0, start:], skip_special_tokens=True).strip())

    merged = reloaded.merge_and_unload()  # a plain transformers model again
    merged.save_pretrained(output / "merged")
    tokenizer.save_pretrained(output / "merged")
    print(f"adapter and merged model in {output}")


if __name__ == "__main__":
    main()
