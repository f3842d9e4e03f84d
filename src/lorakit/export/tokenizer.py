"""The tokenizer as GGUF metadata, in the form llama.cpp's converter writes it for byte-level BPE models.

    tokenizer.ggml.model        "gpt2" (byte-level BPE)
    tokenizer.ggml.pre          which pre-tokenizer regex llama.cpp must apply (see `pre_tokenizer_name`)
    tokenizer.ggml.tokens       every id's token, in byte-level spelling; ids the embedding has beyond the
                                tokenizer become "[PAD<id>]" (type UNUSED), as in llama.cpp's converter
    tokenizer.ggml.token_type   NORMAL, CONTROL (special added tokens), USER_DEFINED (other added tokens)
    tokenizer.ggml.merges       the BPE merges
    special token ids, add_bos/add_eos, tokenizer.chat_template

Merges, special ids and the chat template are read by the `gguf` package's `SpecialVocab`; add_bos/add_eos
are set from what the tokenizer actually does to a text, so llama.cpp prepends exactly what transformers
does. SentencePiece-style vocabularies (byte_fallback, Llama 2 / Mistral v0.1) are refused: llama.cpp
needs their sentencepiece scores, which a tokenizer.json does not carry.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf

from lorakit.errors import LorakitError
from lorakit.io.memory import run_forked

# tokenizer.json Split patterns of the byte-level BPE families llama.cpp knows, by llama.cpp's name.
SPLIT_PATTERNS = {
    "llama-bpe": (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
    "qwen2": (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+"),
}


def pre_tokenizer_name(pre_tokenizer: dict[str, Any] | None, file: Path) -> str:
    """llama.cpp's name for a tokenizer.json pre-tokenizer:

    ByteLevel (GPT-2's regex)                         → gpt-2
    Digits(individual) + ByteLevel (SmolLM)           → smollm
    Split(Llama 3 regex) + ByteLevel(no regex)        → llama-bpe
    Split(Qwen2 regex) + ByteLevel(no regex)          → qwen2
    """
    parts = (pre_tokenizer or {}).get("pretokenizers") if (pre_tokenizer or {}).get("type") == "Sequence" \
        else [pre_tokenizer] if pre_tokenizer else []
    kinds = [part.get("type") for part in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    digits = kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits")
    if digits and parts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        pattern = (parts[0].get("pattern") or {}).get("Regex")
        for name, regex in SPLIT_PATTERNS.items():
            if pattern == regex:
                return name
    named = "+".join(map(str, kinds)) or "none"
    raise LorakitError(f"{file}: pre-tokenizer {named} is not one lorakit can name for llama.cpp "
                       f"(it names gpt-2, smollm, {', '.join(SPLIT_PATTERNS)})")


def add_tokenizer(writer: gguf.GGUFWriter, directory: Path, vocab_size: int) -> None:
    """Write the tokenizer of the model in `directory` (tokenizer.json + tokenizer_config.json).

    It is read in a forked child (`run_forked`) that returns plain lists: loading it with transformers
    (tokenizers, tokenization code, the parsed vocabulary) would otherwise leave ~130 MB resident through
    the streaming export."""
    pre, tokens, types, special = run_forked(_read_tokenizer, directory, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special.add_to_gguf(writer, quiet=True)


def _read_tokenizer(directory: Path, vocab_size: int) -> tuple[str, list[str], list[gguf.TokenType],
                                                                 gguf.SpecialVocab]:
    """(pre-tokenizer name, tokens, token types, special vocabulary with merges and add_bos/add_eos)."""
    from transformers import AutoTokenizer

    file = directory / "tokenizer.json"
    try:
        spec = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LorakitError(f"{file}: not found; a GGUF model carries its tokenizer, "
                           "save it beside the weights") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LorakitError(f"{file}: not valid JSON ({err})") from None
    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise LorakitError(f"{file}: a {model.get('type')} vocabulary with a {decoder.get('type')} decoder; "
                           "lorakit exports byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2, SmolLM style) "
                           "only")
    pre = pre_tokenizer_name(spec.get("pre_tokenizer"), file)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokens, types = _tokens(tokenizer, vocab_size, file)
    special = gguf.SpecialVocab(directory, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise LorakitError(f"{file}: has no BPE merges")
    ids = tokenizer("a")["input_ids"]
    special.add_special_token = {
        "bos": tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id],
        "eos": tokenizer.eos_token_id is not None and ids[-1:] == [tokenizer.eos_token_id],
    }
    return pre, tokens, types, special


def _tokens(tokenizer: Any, vocab_size: int, file: Path) -> tuple[list[str], list[gguf.TokenType]]:
    """Tokens and their types for ids 0..vocab_size-1 (ids the tokenizer lacks become "[PAD<id>]")."""
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= vocab_size:
        raise LorakitError(f"{file}: token id {max(by_id)} does not fit the model's {vocab_size} "
                           "embedding rows")
    added = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[gguf.TokenType] = []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types
