"""Turning token ids into display strings (shared by contexts and hover texts), in the tokenizer's own spelling.

A run of tokens is decoded as a whole, as the tokenizer would (WordPiece joins ``##`` pieces, byte-level BPE keeps
its spaces and multi-byte characters), and each token's span in that text is found by decoding growing prefixes:
token i owns the text that decoding the first i + 1 tokens settled beyond the first i. So the pieces of a window
always join to the window's own decoded text, and a token that ends inside a character owns nothing (the next
token owns the character).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

PAD = -1
"""Id marking a window slot outside the sequence or on a padding token."""


def display(text: str) -> str:
    """Text for one line of display: newlines and tabs made visible."""
    return text.replace("\n", "↵").replace("\t", "⇥")


def decode_token(tokenizer: Any, token_id: int) -> str:
    """One token decoded alone, as display text; ``tokenizer=None`` shows the id."""
    if tokenizer is None:
        return f"<{token_id}>"
    return display(tokenizer.decode([int(token_id)]))


def decode_pieces(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Each real token's display text as it reads in the whole run decoded at once (:data:`PAD` slots skipped).

    ``"".join(decode_pieces(t, ids))`` is the decoded run (made displayable), e.g. ``["__set", "ite", "m"]`` for the
    WordPiece tokens ``__set ##ite ##m``, or ``["The", " cat"]`` for the BPE tokens ``The Ġcat``.
    """
    real = [int(i) for i in ids if int(i) != PAD]
    if tokenizer is None:
        return [f"<{i}>" for i in real]
    prefixes = [""] + [_decode(tokenizer, real[: n + 1]) for n in range(len(real))]
    full = prefixes[-1]
    ends, settled = [], 0
    for text in prefixes[1:]:
        settled = max(settled, _common_prefix(text, full))
        ends.append(settled)
    starts = [0, *ends[:-1]]
    return [display(full[a:b]) for a, b in zip(starts, ends)]


def decode_tokens(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Display text of each real id in the tokenizer's spelling of the whole run (see :func:`decode_pieces`)."""
    return decode_pieces(tokenizer, ids)


def decode_text(tokenizer: Any, ids: Sequence[int]) -> str:
    """The real ids decoded as one run, as display text (one ``decode``; ``tokenizer=None`` shows the ids)."""
    real = [int(i) for i in ids if int(i) != PAD]
    if tokenizer is None:
        return "".join(f"<{i}>" for i in real)
    return display(_decode(tokenizer, real))


def decode_with_token(tokenizer: Any, before: Sequence[int], token_id: int) -> tuple[str, str]:
    """``(text before, the token's own text)`` of a token read after its left context (two ``decode`` calls)."""
    real = [int(i) for i in before if int(i) != PAD]
    if tokenizer is None:
        return "".join(f"<{i}>" for i in real), f"<{token_id}>"
    head, whole = _decode(tokenizer, real), _decode(tokenizer, [*real, int(token_id)])
    cut = _common_prefix(head, whole)
    return display(whole[:cut]), display(whole[cut:])


def _decode(tokenizer: Any, ids: list[int]) -> str:
    if not ids:
        return ""
    text = tokenizer.decode(ids)
    # A window that starts inside a WordPiece word: its first token keeps the continuation mark "##".
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    if text.startswith("##") and convert is not None and str(convert(ids[0])).startswith("##"):
        text = text[2:]
    return text


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
