"""Turning token ids into short display strings (shared by contexts and hover texts)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

PAD = -1
"""Id marking a window slot outside the sequence or on a padding token."""


def decode_token(tokenizer: Any, token_id: int) -> str:
    """One token as display text (newlines and tabs made visible); ``tokenizer=None`` shows the id."""
    if tokenizer is None:
        return f"<{token_id}>"
    text = tokenizer.decode([int(token_id)])
    return text.replace("\n", "↵").replace("\t", "⇥")


def decode_tokens(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Display text of each id, skipping :data:`PAD` slots."""
    return [decode_token(tokenizer, i) for i in ids if int(i) != PAD]
