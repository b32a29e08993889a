"""Max- and min-activating contexts per latent, collected while streaming, and their display formats.

Each kept example stores its context window (token ids before and after) at collection time, so nothing but
the top-k per latent is ever held. Contexts are rendered in the tokenizer's own spelling of the whole window
(:func:`~bilae.analysis.text.decode_pieces`).

"max" and "min" follow the sign of the latent's signal. A bilinear latent f = (l·x̂)(r·x̂) can carry its signal
in either sign, so the sign of a latent is that of its activation of largest magnitude in the sample: "max" are the
k strongest activations in that direction (for a latent whose signal is negative, its most negative values) and
"min" the k strongest in the other direction, each shown with its true signed value.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from bilae.analysis.overlap import check_indices
from bilae.analysis.text import PAD, decode_pieces
from bilae.errors import DataError, UsageError

Which = Literal["max", "min"]


@dataclass
class ExampleSet:
    """Top-k examples of n latents, best first."""

    values: Tensor
    """(n, k) activations."""
    sequence: Tensor
    """(n, k) sequence index across all batches."""
    position: Tensor
    """(n, k) token position in the sequence."""
    windows: Tensor
    """(n, k, before + 1 + after) token ids around the example; :data:`PAD` outside the sequence or masked."""


@dataclass
class ActivationExamples:
    """Max- and min-activating examples of a list of latents."""

    indices: Tensor
    """(n,) the latents."""
    max: ExampleSet
    """The strongest examples in the direction of the latent's signal (most negative first when it is negative)."""
    min: ExampleSet
    """The strongest examples in the other direction."""
    before: int
    after: int
    signs: Tensor | None = None
    """(n,) +1 or -1: the sign of each latent's activation of largest magnitude (``None``: all +1)."""

    def row(self, latent: int) -> int:
        """Row of ``latent`` in the example sets."""
        hits = (self.indices == latent).nonzero()
        if hits.numel() == 0:
            raise UsageError(f"latent {latent} was not collected; collected: {self.indices.tolist()[:20]}")
        return int(hits[0, 0])


@dataclass
class ContextRecord:
    """One example as plain data, ready for a terminal, HTML or a table."""

    latent: int
    which: str
    value: float
    sequence: int
    position: int
    before: list[str]
    token: str
    after: list[str]
    sign: int = 1
    """The sign of the latent's signal (-1: "max" holds its most negative values)."""


@torch.no_grad()
def collect_examples(
    batches: Iterable[tuple[Tensor, ...]],
    features: Callable[[Tensor], Tensor],
    indices: Sequence[int] | Tensor | None = None,
    k: int = 8,
    before: int = 8,
    after: int = 4,
) -> ActivationExamples:
    """Keep the top-``k`` max and min activations of the latents ``indices`` (all when None).

    Args:
        batches: tuples ``(acts (B, T, d), mask (B, T), input_ids (B, T), ...)``.
        features: maps activations (N, d) to latents (N, m), e.g. ``coder.features``.
        indices: latents to keep examples for.
        k: examples per latent and direction.
        before, after: context tokens kept on each side.

    Raises:
        DataError: no batch held a real token.
    """
    if k <= 0 or before < 0 or after < 0:
        raise UsageError(
            f"k must be positive and before/after >= 0, got k={k}, before={before}, after={after}"
        )
    kept: dict[str, ExampleSet] = {}
    idx, offset = None, 0
    for batch in batches:
        acts, mask, ids = batch[0], batch[1].bool(), batch[2]
        where = mask.nonzero()
        f = features(acts[mask]) if where.shape[0] else None
        if f is not None:
            idx = check_indices(
                range(f.shape[-1]) if indices is None else indices, f.shape[-1], "latent index"
            )
            f = f[:, idx].T.to(torch.promote_types(f.dtype, torch.float32))  # (n, N); half → float
            for which, sign in (("max", 1.0), ("min", -1.0)):
                found = _batch_top(sign * f, where, ids, mask, k, before, after, offset)
                found.values = found.values * sign
                kept[which] = found if which not in kept else _merge(kept[which], found, k, sign)
        offset += acts.shape[0]
    if idx is None:
        raise DataError("no examples: the batches held no real (unmasked) tokens")
    return by_signal(
        ActivationExamples(indices=idx, max=kept["max"], min=kept["min"], before=before, after=after)
    )


def by_signal(examples: ActivationExamples) -> ActivationExamples:
    """Make "max" the direction of each latent's signal: swap max and min of the latents whose activation of
    largest magnitude is negative (see the module docstring); ``signs`` records which were swapped."""
    top, bottom = examples.max, examples.min
    signs = torch.where(top.values[:, 0] >= -bottom.values[:, 0], 1, -1)
    flip = signs < 0

    def pick(a: ExampleSet, b: ExampleSet) -> ExampleSet:
        def take(name: str) -> Tensor:
            x, y = getattr(a, name), getattr(b, name)
            return torch.where(flip.view(-1, *([1] * (x.ndim - 1))), y, x)

        return ExampleSet(take("values"), take("sequence"), take("position"), take("windows"))

    return ActivationExamples(
        indices=examples.indices, max=pick(top, bottom), min=pick(bottom, top), before=examples.before,
        after=examples.after, signs=signs,
    )  # fmt: skip


def context_records(
    examples: ActivationExamples, tokenizer: Any, latent: int, which: Which = "max", k: int | None = None
) -> list[ContextRecord]:
    """The examples of ``latent`` as :class:`ContextRecord` s (best first), each window decoded as a whole."""
    if which not in ("max", "min"):
        raise UsageError(f"which must be 'max' or 'min', got {which!r}")
    sets, row = getattr(examples, which), examples.row(latent)
    sign = 1 if examples.signs is None else int(examples.signs[row])
    records = []
    for j in range(sets.values.shape[1] if k is None else min(k, sets.values.shape[1])):
        window = sets.windows[row, j].tolist()
        pieces = decode_pieces(tokenizer, window)
        center = sum(1 for i in window[: examples.before] if i != PAD)  # the token itself is never PAD
        records.append(
            ContextRecord(
                latent=latent,
                which=which,
                value=float(sets.values[row, j]),
                sequence=int(sets.sequence[row, j]),
                position=int(sets.position[row, j]),
                before=pieces[:center],
                token=pieces[center],
                after=pieces[center + 1 :],
                sign=sign,
            )
        )
    return records


def to_ansi(record: ContextRecord) -> str:
    """One line for a terminal: the activating token on a green (max) or red (min) background."""
    color = "42" if record.which == "max" else "41"
    text = f"{''.join(record.before)}\x1b[1;30;{color}m{record.token}\x1b[0m{''.join(record.after)}"
    return f"{record.value:+8.3f}  {text}"


def to_html(records: Sequence[ContextRecord], title: str | None = None) -> str:
    """An HTML fragment: one line per record, the activating token in a coloured span (text escaped)."""
    scale = max((abs(r.value) for r in records), default=0.0) or 1.0
    if title and any(r.sign < 0 for r in records):
        title += " (negative signal: max shows its most negative values)"
    lines = [f"<div><b>{html.escape(title)}</b></div>"] if title else []
    for r in records:
        rgb = "34,139,34" if r.which == "max" else "200,40,40"
        alpha = 0.25 + 0.75 * abs(r.value) / scale
        token = (
            f'<span style="background:rgba({rgb},{alpha:.2f});font-weight:bold">{html.escape(r.token)}</span>'
        )
        lines.append(
            f'<div style="font-family:monospace;white-space:pre">{r.value:+.3f}  '
            f"{html.escape(''.join(r.before))}{token}{html.escape(''.join(r.after))}</div>"
        )
    return "\n".join(lines)


def to_rows(records: Sequence[ContextRecord]) -> list[dict[str, Any]]:
    """Table rows: latent, which, sign, value, sequence, position, before, token, after."""
    return [
        {
            "latent": r.latent,
            "which": r.which,
            "sign": r.sign,
            "value": r.value,
            "sequence": r.sequence,
            "position": r.position,
            "before": "".join(r.before),
            "token": r.token,
            "after": "".join(r.after),
        }
        for r in records
    ]


def _batch_top(
    f: Tensor, where: Tensor, ids: Tensor, mask: Tensor, k: int, before: int, after: int, offset: int
) -> ExampleSet:
    values, token = f.topk(min(k, f.shape[1]), dim=1)  # (n, k')
    rows, pos = where[token, 0], where[token, 1]
    cols = pos[..., None] + torch.arange(-before, after + 1, device=pos.device)
    inside = (cols >= 0) & (cols < ids.shape[1])
    safe = cols.clamp(0, ids.shape[1] - 1)
    real = inside & mask[rows[..., None], safe]
    windows = torch.where(real, ids[rows[..., None], safe], torch.full_like(safe, PAD))
    return ExampleSet(values=values, sequence=rows + offset, position=pos, windows=windows)


def _merge(a: ExampleSet, b: ExampleSet, k: int, sign: float) -> ExampleSet:
    values = torch.cat([a.values, b.values], dim=1)
    top = (sign * values).topk(min(k, values.shape[1]), dim=1).indices

    def pick(name: str) -> Tensor:
        joined = torch.cat([getattr(a, name), getattr(b, name)], dim=1)
        index = top if joined.ndim == 2 else top[..., None].expand(-1, -1, joined.shape[2])
        return joined.gather(1, index)

    return ExampleSet(
        values=pick("values"), sequence=pick("sequence"), position=pick("position"), windows=pick("windows")
    )
