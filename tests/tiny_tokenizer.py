"""A character-level chat tokenizer built in code, for machines without the embedded model (the GPU machine
of benchmarks/gpu/run.sh has only torch, transformers, accelerate and peft).

Every printable ASCII character and the newline is one token; `<|im_start|>`/`<|im_end|>` are special tokens
and the chat template is ChatML, as SmolLM2's. `tiny_chat_dir(directory)` saves it beside a tiny random Llama
of its vocabulary: a model directory the trainers accept as --model.
"""

from __future__ import annotations

from pathlib import Path

SPECIALS = ["<pad>", "<unk>", "<s>", "<|im_start|>", "<|im_end|>"]
CHARS = [chr(i) for i in range(32, 127)] + ["\n"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def char_tokenizer():
    """A transformers fast tokenizer: one token per character, ChatML specials, pad `<pad>`, eos
    `<|im_end|>`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + CHARS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
    )


def tiny_chat_dir(directory: Path) -> Path:
    """Save the character tokenizer and a tiny random Llama (hidden 32, 2 layers) of its vocabulary to
    `directory`; returns it."""
    from tiny_models import tiny_llama

    tokenizer = char_tokenizer()
    model = tiny_llama(
        perturb=False,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
