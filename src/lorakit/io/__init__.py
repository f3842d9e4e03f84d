"""Adapters and checkpoints on disk: `peft_keys` (PEFT's tensor names), `peft_format` (adapter files and a
model's adapter tensors), `pretrained` (a live model's adapters loaded and saved), `portable` (OLoRA/PiSSA
saved for the untouched base), `checkpoint` (sharded safetensors checkpoints), `atomic` (all-or-nothing
writes).
"""
