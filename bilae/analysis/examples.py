"""Max- and min-activating contexts per latent, collected while streaming, and their display formats.

Each kept example stores its context window (token ids before and after) at collection time, so nothing but
the top-k per latent is ever held.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from bilae.analysis.overlap import check_indices
from bilae.analysis.text import PAD, decode_token, decode_tokens
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
    min: ExampleSet
    before: int
    after: int

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
    return ActivationExamples(indices=idx, max=kept["max"], min=kept["min"], before=before, after=after)


def context_records(
    examples: ActivationExamples, tokenizer: Any, latent: int, which: Which = "max", k: int | None = None
) -> list[ContextRecord]:
    """The examples of ``latent`` as :class:`ContextRecord` s (best first)."""
    if which not in ("max", "min"):
        raise UsageError(f"which must be 'max' or 'min', got {which!r}")
    sets, row = getattr(examples, which), examples.row(latent)
    records = []
    for j in range(sets.values.shape[1] if k is None else min(k, sets.values.shape[1])):
        window = sets.windows[row, j].tolist()
        records.append(
            ContextRecord(
                latent=latent,
                which=which,
                value=float(sets.values[row, j]),
                sequence=int(sets.sequence[row, j]),
                position=int(sets.position[row, j]),
                before=decode_tokens(tokenizer, window[: examples.before]),
                token=decode_token(tokenizer, window[examples.before]),
                after=decode_tokens(tokenizer, window[examples.before + 1 :]),
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
    """Table rows: latent, which, value, sequence, position, before, token, after."""
    return [
        {
            "latent": r.latent,
            "which": r.which,
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
