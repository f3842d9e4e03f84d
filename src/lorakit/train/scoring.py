"""Exact-match scoring of generated answers against reference answers."""

from __future__ import annotations

from collections.abc import Sequence

# End-of-turn markers of common chat templates. Generation decoded with skip_special_tokens=True
# never contains them, but a decode that keeps special tokens (or a model that spells the marker
# out as plain text) would otherwise turn a right answer into a mismatch.
END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")


def normalise_answer(text: str) -> str:
    """`text` without surrounding whitespace and without trailing end-of-turn markers.

    Nothing else changes (case, inner whitespace, punctuation): exact match is meant to be exact.
    """
    text = text.strip()
    stripped = True
    while stripped:  # a marker may repeat, or be followed by whitespace or another marker
        stripped = False
        for marker in END_OF_TURN_MARKERS:
            if text.endswith(marker):
                text = text[: -len(marker)].rstrip()
                stripped = True
    return text


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction in [0, 1] of predictions equal to their reference after `normalise_answer`."""
    if len(predictions) != len(references):
        raise ValueError(f"exact_match: {len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("exact_match: no references to score")
    hits = sum(normalise_answer(p) == normalise_answer(r) for p, r in zip(predictions, references))
    return hits / len(references)
