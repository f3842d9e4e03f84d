"""Tiny models with tokenizers, built in code, for the GGUF export tests (issue 22).

Each family gets the kind of byte-level BPE tokenizer it ships with, trained here in milliseconds on the
bundled demo data: Llama 3 style (Split regex "llama-bpe"), Qwen2 style ("qwen2"), GPT-2 style (plain
ByteLevel, used for Mistral), and SmolLM2's real tokenizer (the embedded model's) for a tied Llama.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tiny_models import clone_model, lk_config, perturb_adapter, quiet, seeded

import lorakit

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# family, tokenizer style, tied embeddings, embedding rows beyond the tokenizer
CASES = {
    "llama": ("llama", "llama-bpe", False, 5),
    "mistral": ("mistral", "gpt-2", False, 0),
    "qwen2": ("qwen2", "qwen2", True, 3),
    "smollm2": ("llama", "smollm2", True, 0),
}
PROMPTS = 4
NEW_TOKENS = 8
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def demo_texts() -> list[str]:
    from lorakit.train.data import bundled_dataset_path, load_records

    records = load_records(bundled_dataset_path("train"))[:300]
    return [m["content"] for r in records for m in r["messages"]]


def bpe_tokenizer(directory: Path, pre: str, vocab_size: int = 400):
    """A byte-level BPE tokenizer with ChatML specials (ids 0-2), saved to `directory`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    if pre == "gpt-2":
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        pattern = {"llama-bpe": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT}[pre]
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(demo_texts(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", unk_token="<|endoftext|>", pad_token="<|im_end|>")
    fast.chat_template = CHATML
    fast.save_pretrained(directory)
    return fast


def tiny_model(family: str, vocab: int, tied: bool, seed: int = 0) -> torch.nn.Module:
    """hidden 32, 2 layers, 4 heads of 8, 2 KV heads; random norms (and Qwen2's q/k/v biases)."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
               "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    config_class, model_class = classes[family]
    config = config_class(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                          rope_theta=5000.0)
    torch.manual_seed(seed)
    model = model_class(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def save_adapter(base: torch.nn.Module, directory: Path, seed: int = 7, **config) -> lorakit.PeftModel:
    config.setdefault("target_modules", ALL_LINEAR)
    with quiet(), seeded(seed):
        model = lorakit.get_peft_model(clone_model(base), lk_config(init_lora_weights=False, **config))
    perturb_adapter(model, seed=seed, scale=0.1)
    model.eval().save_pretrained(directory)
    return model


def make_base(directory: Path, family: str, tokenizer: str, tied: bool, extra_rows: int = 0,
              smollm_dir: Path | None = None) -> torch.nn.Module:
    """Save a tiny `family` model with its tokenizer to `directory`; `extra_rows` pads the embedding
    beyond the tokenizer (as Qwen2's real checkpoints do)."""
    from transformers import AutoTokenizer

    if tokenizer == "smollm2":
        tok = AutoTokenizer.from_pretrained(smollm_dir)
        tok.save_pretrained(directory)
    else:
        tok = bpe_tokenizer(directory, tokenizer)
    model = tiny_model(family, len(tok) + extra_rows, tied)
    model.save_pretrained(directory)
    return model


def gguf_fields(path: Path) -> dict:
    """The file's metadata (scalars and strings; arrays as their length) and tensor names → (type, shape)."""
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        fields[key] = len(value) if isinstance(value, list) else value
    tensors = {t.name: (t.tensor_type.name, tuple(int(n) for n in reversed(t.shape))) for t in reader.tensors}
    return {"fields": fields, "tensors": tensors}


def dequantized(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF file as float32 in PyTorch order (the `gguf` package's dequantizers)."""
    import gguf

    reader = gguf.GGUFReader(path)
    return {t.name: torch.from_numpy(gguf.dequantize(t.data, t.tensor_type).copy()).reshape(
        tuple(int(n) for n in reversed(t.shape))) for t in reader.tensors}


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def build_family(name: str, root: Path, smollm_dir: Path) -> dict:
    """A tiny base of CASES[name] with its tokenizer, an all-linear adapter, the float32 merged checkpoint,
    and the bundled test prompts as token ids."""
    from transformers import AutoTokenizer

    from lorakit.merge.streaming import merge_checkpoint

    model_family, tokenizer, tied, extra = CASES[name]
    base = make_base(root / "base", model_family, tokenizer, tied, extra, smollm_dir=smollm_dir)
    save_adapter(base, root / "adapter", r=4, lora_alpha=8)
    merge_checkpoint(root / "base", [root / "adapter"], root / "merged", verify=False)
    tok = AutoTokenizer.from_pretrained(root / "base")
    prompts = [tok(text, add_special_tokens=False)["input_ids"] for text in bundled_prompts(tok)]
    return {"name": name, "root": root, "tokenizer": tok, "prompts": prompts, "tied": tied, "extra": extra}


def load_gguf(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    with quiet():
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


def load_dir(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    with quiet():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def bundled_prompts(tokenizer) -> list[list[int]]:
    """The first bundled test prompts as text, chat template applied."""
    from lorakit.train.data import bundled_dataset_path, load_records, prompt_messages

    records = load_records(bundled_dataset_path("test"))[:PROMPTS]
    return [tokenizer.apply_chat_template(prompt_messages(r), tokenize=False, add_generation_prompt=True)
            for r in records]


@torch.no_grad()
def round_matrices(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Round every matrix once to `dtype` and back, as the GGUF export stores them (vectors stay f32)."""
    for param in model.parameters():
        if param.dim() == 2:
            param.copy_(param.to(dtype).float())


@torch.no_grad()
def greedy(model: torch.nn.Module, ids: list[int]) -> list[int]:
    """NEW_TOKENS greedy tokens (no stop); the mask is explicit, as the prompt contains the pad id."""
    tensor = torch.tensor([ids])
    out = model.generate(tensor, attention_mask=torch.ones_like(tensor), max_new_tokens=NEW_TOKENS,
                         do_sample=False, pad_token_id=2, eos_token_id=None)
    return out[0, len(ids):].tolist()


@torch.no_grad()
def prompt_logits(model: torch.nn.Module, prompts: list[list[int]]) -> torch.Tensor:
    return torch.cat([model(torch.tensor([ids])).logits[0] for ids in prompts])
