"""Turning validated records into training examples: chat rendering, loss mask, truncation, packing, batches.

An example is `{"input_ids": [...], "labels": [...], "truncated": bool}`, where `labels` equals
`input_ids` on the tokens the model learns to produce and IGNORE_INDEX elsewhere (labels are not
shifted; the loss shifts them).

What is learned, by record format:
- `messages`: every assistant turn, including the template's end-of-turn token (`<|im_end|>` for
  ChatML) so the model learns to stop; system, user and tool turns and the template's scaffolding
  (`<|im_start|>assistant\\n`) are masked.
- `prompt`/`completion`: the assistant turns of the completion. Plain strings are rendered as one
  user turn and one assistant turn with the chat template, the same way the evaluation prompts the
  model; with a tokenizer that has no chat template they are concatenated as raw text and an EOS
  token is appended to the completion.
- `text`: every token, with EOS appended.
`train_on_prompt=True` learns every token of every format.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from jinja2 import TemplateError  # chat templates are jinja2 (a dependency of torch)
from torch import Tensor

from lorakit.errors import DataError

# torch.nn.functional.cross_entropy's default ignore_index: positions with this label carry no loss.
IGNORE_INDEX = -100

Messages = list[dict[str, Any]]


def conversation(record: Mapping[str, Any]) -> tuple[Messages, int] | None:
    """(messages, index of the first message whose assistant turns are learned), or None for `text`.

    A `prompt`/`completion` record becomes prompt messages followed by completion messages; only the
    completion is learned (assistant turns inside a prompt, such as few-shot examples, are context).
    """
    if "messages" in record:
        return list(record["messages"]), 0
    if "prompt" in record:
        prompt, completion = record["prompt"], record["completion"]
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        return prompt + list(completion), len(prompt)
    return None


def encode_example(record: Mapping[str, Any], tokenizer, max_seq_len: int,
                   train_on_prompt: bool = False) -> dict[str, Any]:
    """Token ids and labels of one validated record, cut to its first `max_seq_len` tokens."""
    conv = conversation(record)
    if conv is None:
        input_ids = _with_eos(_tokenize(tokenizer, record["text"], special=True), tokenizer)
        labels = list(input_ids)
    elif tokenizer.chat_template is not None:
        input_ids, labels = _encode_chat(record, *conv, tokenizer)
    elif isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        input_ids, labels = _encode_raw_pair(record["prompt"], record["completion"], tokenizer)
    else:
        raise DataError(
            f"{_location(record)}: chat data needs a tokenizer with a chat template, and this one has "
            f'none (use a chat model, or "text" / string "prompt"+"completion" data)'
        )
    if train_on_prompt:
        labels = list(input_ids)
    truncated = len(input_ids) > max_seq_len
    return {"input_ids": input_ids[:max_seq_len], "labels": labels[:max_seq_len], "truncated": truncated}


def _encode_chat(record: Mapping[str, Any], messages: Messages, first_trained: int,
                 tokenizer) -> tuple[list[int], list[int]]:
    """Render with the chat template; label each learned assistant turn's tokens."""
    try:
        full = _render(tokenizer, messages)
        spans = _assistant_spans(tokenizer, messages, first_trained, full, record)
    except (
        TemplateError,
        TypeError,
        ValueError,
    ) as error:  # raised by the template (e.g. roles must alternate)
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(
            f"{_location(record)}: the chat template rejected this conversation ({message})"
        ) from error
    # The template already contains any BOS it wants, so the tokenizer must not add another.
    input_ids = _tokenize(tokenizer, full, special=False)
    labels = [IGNORE_INDEX] * len(input_ids)
    stops = _end_of_turn_ids(tokenizer)
    for start_char, content_end_char, end_char in spans:
        start = _boundary(tokenizer, input_ids, full[:start_char])
        content_end = _boundary(tokenizer, input_ids, full[:content_end_char], straddle_inside=True)
        end = max(_boundary(tokenizer, input_ids, full[:end_char], straddle_inside=True), content_end)
        # Learn the content and the end-of-turn token right after it (not the "\n" that follows).
        stop = next((j + 1 for j in range(content_end, end) if input_ids[j] in stops), end)
        labels[start:stop] = input_ids[start:stop]
    return input_ids, labels


def _assistant_spans(tokenizer, messages: Messages, first_trained: int, full: str,
                     record: Mapping[str, Any]) -> list[tuple[int, int, int]]:
    """Character offsets in `full` of each learned assistant turn: (start, end of content, end of turn).

    A turn starts where the prompt for it (the conversation before it, rendered with the generation
    prompt) ends, and ends where the conversation up to and including it ends. Templates whose
    rendering of earlier text changes when more turns follow (a header counting the turns, dropped
    old reasoning) break that prefix property; for them `_search_span` finds the turn in `full`.
    """
    spans = []
    cursor = 0  # where the previous message's content ends in `full`, for the search fallback
    for index, message in enumerate(messages):
        content = message["content"].strip()  # some templates trim the content
        if message["role"] != "assistant" or index < first_trained:  # context, not learned
            found = full.find(content, cursor)
            cursor = found + len(content) if found >= 0 else cursor
            continue
        start_text = _render(tokenizer, messages[:index], generation_prompt=True) if index else ""
        end_text = _render(tokenizer, messages[: index + 1])
        if (
            index
            and len(start_text) <= len(end_text)
            and full.startswith(start_text)
            and full.startswith(end_text)
        ):
            start, end = len(start_text), len(end_text)
            found = full.find(content, start, end)  # after any markup the template puts before it
            content_end = found + len(content) if found >= 0 else end
        else:
            start, content_end, end = _search_span(tokenizer, messages, index, full, cursor, record)
        spans.append((start, content_end, end))
        cursor = content_end
    return spans


def _search_span(tokenizer, messages: Messages, index: int, full: str, cursor: int,
                 record: Mapping[str, Any]) -> tuple[int, int, int]:
    """Assistant message `index` located by searching `full` after `cursor` (the previous message).

    Its content is looked for right after the template's generation prompt (the difference between
    the conversation before it rendered with and without that prompt), so that the same words in an
    earlier message are not mistaken for it; failing that, the content alone. The turn then ends at
    the first special token after the content.
    """
    content = messages[index]["content"].strip()
    generation_prompt = ""
    if index:
        with_prompt = _render(tokenizer, messages[:index], generation_prompt=True)
        without = _render(tokenizer, messages[:index])
        generation_prompt = with_prompt[len(without):] if with_prompt.startswith(without) else ""
    found = full.find(generation_prompt + content, cursor) if generation_prompt else -1
    if found >= 0:
        start = found + len(generation_prompt)
    else:
        start = full.find(content, cursor)
    if start < 0:
        raise DataError(f"{_location(record)}: the chat template does not reproduce assistant message "
                        f"{index + 1} verbatim, so its tokens cannot be found for the loss mask "
                        f"(set train_on_prompt to learn every token instead)")
    return start, start + len(content), len(full)


def _boundary(tokenizer, input_ids: list[int], prefix: str, straddle_inside: bool = False) -> int:
    """Number of leading tokens of `input_ids` that encode `prefix` (a prefix of the encoded text).

    Usually tokenising the prefix alone yields exactly the first tokens of the whole text. When a
    token straddles the boundary (BPE merged characters from both sides), the two tokenisations part
    at that token: it counts as after the boundary (a turn's start) unless `straddle_inside` counts
    it as before (a turn's content end), so that a straddling token is always learned.
    """
    prefix_ids = _tokenize(tokenizer, prefix, special=False)
    common = _common_prefix(prefix_ids, input_ids)
    if common == len(prefix_ids) or not straddle_inside:
        return common
    return min(common + 1, len(input_ids))


def _encode_raw_pair(prompt: str, completion: str, tokenizer) -> tuple[list[int], list[int]]:
    """prompt + completion as plain text (no chat template), EOS appended; the completion is learned."""
    input_ids = _with_eos(_tokenize(tokenizer, prompt + completion, special=True), tokenizer)
    start = _common_prefix(_tokenize(tokenizer, prompt, special=True), input_ids)
    return input_ids, [IGNORE_INDEX] * start + input_ids[start:]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _render(tokenizer, messages: Messages, generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _tokenize(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special, return_attention_mask=False)["input_ids"])


def _with_eos(input_ids: list[int], tokenizer) -> list[int]:
    eos = tokenizer.eos_token_id
    return input_ids + [eos] if eos is not None and (not input_ids or input_ids[-1] != eos) else input_ids


def _end_of_turn_ids(tokenizer) -> set[int]:
    """Special tokens: a chat template ends each turn with one (`<|im_end|>`, `<|eot_id|>`, `</s>` ...)."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    return ids


def _location(record: Mapping[str, Any]) -> str:
    return getattr(record, "location", "example")


def pack_examples(examples: Sequence[Mapping[str, Any]], max_seq_len: int) -> list[dict[str, list[int]]]:
    """Concatenate whole examples, in order, into blocks of at most `max_seq_len` tokens.

    Next-fit: an example goes into the current block if it fits, otherwise it starts a new one, so no
    example is ever split and every token is kept. Each example already ends in an end-of-turn/EOS
    token, which separates it from the next one.

    Blocks carry `position_ids` that restart at 0 for each example, so rotary positions match
    unpacked training. Attention across examples within a block depends on the caller: with an
    attention mask (as `collate` returns), tokens attend to earlier examples in the block, the usual
    concatenation packing; transformers >= 5 instead builds per-example masks from these position_ids
    when the model is called with position_ids and no attention mask. The first token of each example
    is unlabelled, so no example learns to predict its start from the previous one — the labelled
    tokens are exactly those of unpacked training.
    """
    blocks: list[dict[str, list[int]]] = []
    for example in examples:
        n = len(example["input_ids"])
        if n > max_seq_len:
            raise ValueError(f"pack_examples: an example has {n} tokens, more than max_seq_len={max_seq_len}")
        if not blocks or len(blocks[-1]["input_ids"]) + n > max_seq_len:
            blocks.append({"input_ids": [], "labels": [], "position_ids": []})
        block = blocks[-1]
        block["input_ids"].extend(example["input_ids"])
        block["labels"].extend([IGNORE_INDEX, *example["labels"][1:]])
        block["position_ids"].extend(range(n))
    return blocks


def collate(features: Sequence[Mapping[str, Any]], pad_token_id: int | None) -> dict[str, Tensor]:
    """Right-pad examples (or packed blocks) into `input_ids`, `attention_mask`, `labels` tensors.

    Padding carries label IGNORE_INDEX and attention 0. Packed blocks also get `position_ids`; their
    padding counts from 0 again, so it forms a separate segment rather than extending the last example.
    Extra keys (such as `truncated`) are ignored.
    """
    if not features:
        raise ValueError("collate: empty batch")
    # Padded positions are neither attended to nor learned, so without a pad token any id will do.
    pad = 0 if pad_token_id is None else pad_token_id
    width = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), width), pad, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(features), width), dtype=torch.long)
    packed = all("position_ids" in f for f in features)
    position_ids = torch.zeros((len(features), width), dtype=torch.long) if packed else None
    for row, feature in enumerate(features):
        n = len(feature["input_ids"])
        input_ids[row, :n] = torch.tensor(feature["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.tensor(feature["labels"], dtype=torch.long)
        attention_mask[row, :n] = 1
        if position_ids is not None:
            position_ids[row, :n] = torch.tensor(feature["position_ids"], dtype=torch.long)
            position_ids[row, n:] = torch.arange(width - n)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if position_ids is not None:
        batch["position_ids"] = position_ids
    return batch
