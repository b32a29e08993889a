"""Sampling the manifold of a quadratic form M from activations (pure and model-agnostic).

For each real token: x̂ = x/‖x‖, coordinates = projections on the three eigenvectors of M with largest |λ|
(from the weights, not PCA of the points), value = x̂ᵀMx̂. A lifted (d+1)×(d+1) form (an affine coder's) acts on
z = [1, x̂] instead. The top-k tokens by |value| are kept while
streaming, so a sample never holds more than k + one batch of tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor

from bilae.analysis.forms import QuadraticForm, Spectrum, spectrum, symmetrize
from bilae.analysis.text import PAD, decode_token, decode_with_token
from bilae.errors import DataError, UsageError

# (acts (B, T, d), mask (B, T) bool, input_ids (B, T)[, predicted next ids (B, T)])
Batch = tuple[Tensor, ...]


@dataclass
class ManifoldSample:
    """The kept tokens, sorted by |value| descending."""

    coords: Tensor
    """(k, 3) projections of x̂ on the top-3 eigenvectors."""
    values: Tensor
    """(k,) x̂ᵀMx̂."""
    token_ids: Tensor
    """(k,) the token at each point."""
    sequence: Tensor
    """(k,) index of the sequence across all batches (batch-major)."""
    position: Tensor
    """(k,) position of the token in its sequence."""
    context: Tensor
    """(k, c) ids of the c tokens before it; :data:`PAD` outside the sequence or on masked tokens."""
    predictions: Tensor | None
    """(k,) the model's predicted next token, when the batches carried one."""
    eigenvalues: Tensor
    """(3,) eigenvalues of the three axes."""

    def __len__(self) -> int:
        return self.values.shape[0]

    def top(self, k: int) -> ManifoldSample:
        """The first ``k`` points (largest |value|)."""
        return _take(self, slice(0, k))


def sample_manifold(
    batches: Iterable[Batch],
    form: Tensor | QuadraticForm,
    k: int,
    context: int = 8,
    axes: Spectrum | None = None,
) -> ManifoldSample:
    """Stream over ``batches`` and keep the ``k`` tokens with largest |x̂ᵀMx̂|.

    Args:
        batches: tuples ``(acts (B, T, d), mask (B, T), input_ids (B, T))``, optionally with a fourth
            ``(B, T)`` tensor of the model's predicted next tokens.
        form: M (d×d, or (d+1)×(d+1) on z = [1, x̂]; symmetrised here) or a :class:`QuadraticForm`.
        k: number of tokens to keep.
        context: tokens of left context to keep per point.
        axes: a precomputed spectrum of M (computed here otherwise).

    Raises:
        DataError: no real token in any batch.
    """
    matrix = symmetrize(form.matrix if isinstance(form, QuadraticForm) else form).detach()
    if k <= 0 or context < 0:
        raise UsageError(f"k must be positive and context >= 0, got k={k}, context={context}")
    axes = axes or spectrum(matrix)
    kept: ManifoldSample | None = None
    offset = 0
    for batch in batches:
        found = _batch_top(batch, matrix, axes.top(3), k, context, offset)
        offset += batch[0].shape[0]
        kept = found if kept is None else _merge(kept, found, k)
    if kept is None or len(kept) == 0:
        raise DataError("the manifold sample is empty: the batches held no real (unmasked) tokens")
    return replace(kept, eigenvalues=axes.eigenvalues[:3].clone())


def hover_texts(
    sample: ManifoldSample,
    tokenizer: Any,
    predictions: Tensor | Callable[[ManifoldSample], Tensor] | None = None,
) -> list[str]:
    """``"…context [token] → prediction"`` per point.

    ``predictions`` may be ids (k,), logits (k, vocab) (e.g. an LM head applied to the points), or a callable
    returning either from the sample; by default the sample's own predictions are used, if any.
    """
    if callable(predictions):
        predictions = predictions(sample)
    if predictions is None:
        predictions = sample.predictions
    if predictions is not None and predictions.ndim == 2:
        predictions = predictions.argmax(-1)
    texts = []
    for i in range(len(sample)):
        context, token = decode_with_token(tokenizer, sample.context[i].tolist(), int(sample.token_ids[i]))
        text = f"…{context} [{token}]"
        if predictions is not None:
            text += f" → {decode_token(tokenizer, int(predictions[i]))}"
        texts.append(text)
    return texts


def _batch_top(
    batch: Batch, matrix: Tensor, axes: Tensor, k: int, context: int, offset: int
) -> ManifoldSample:
    acts, mask, ids = batch[0], batch[1].bool(), batch[2]
    _check_batch(acts, mask, ids, matrix)
    where = mask.nonzero()  # (N, 2) rows and positions of the real tokens
    x = acts[mask].to(matrix.dtype)
    xhat = lift_to(x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny), matrix)
    values = ((xhat @ matrix) * xhat).sum(-1)
    top = values.abs().topk(min(k, values.shape[0])).indices
    rows, pos = where[top, 0], where[top, 1]
    return ManifoldSample(
        coords=xhat[top] @ axes,
        values=values[top],
        token_ids=ids[rows, pos],
        sequence=rows + offset,
        position=pos,
        context=_left_context(ids, mask, rows, pos, context),
        predictions=batch[3][rows, pos] if len(batch) > 3 else None,
        eigenvalues=matrix.new_zeros(3),
    )


def _left_context(ids: Tensor, mask: Tensor, rows: Tensor, pos: Tensor, width: int) -> Tensor:
    cols = pos[:, None] + torch.arange(-width, 0, device=pos.device)[None, :]
    inside = cols >= 0
    safe = cols.clamp_min(0)
    real = inside & mask[rows[:, None], safe]
    return torch.where(real, ids[rows[:, None], safe], torch.full_like(safe, PAD))


def _check_batch(acts: Tensor, mask: Tensor, ids: Tensor, matrix: Tensor) -> None:
    if acts.ndim != 3 or mask.shape != acts.shape[:2] or ids.shape != mask.shape:
        raise UsageError(
            f"a batch must be acts (B, T, d), mask (B, T), input_ids (B, T); got {tuple(acts.shape)}, "
            f"{tuple(mask.shape)}, {tuple(ids.shape)}"
        )
    if matrix.shape[0] not in (acts.shape[-1], acts.shape[-1] + 1):
        raise UsageError(
            f"activations have d={acts.shape[-1]} but the form is {tuple(matrix.shape)}; valid: (d, d), or "
            "(d+1, d+1) for a lifted form on z = [1, x̂]"
        )


def lift_to(xhat: Tensor, matrix: Tensor) -> Tensor:
    """x̂ itself for a d×d form, z = [1, x̂] for a lifted (d+1)×(d+1) one (an affine coder's).  (N, d) → (N, d|d+1)"""
    if matrix.shape[0] == xhat.shape[-1]:
        return xhat
    return torch.cat([torch.ones_like(xhat[..., :1]), xhat], -1)


def _merge(a: ManifoldSample, b: ManifoldSample, k: int) -> ManifoldSample:
    if (a.predictions is None) != (b.predictions is None):
        raise UsageError("either every batch carries predicted next tokens or none does")
    joined: dict[str, Any] = {
        f.name: None if getattr(a, f.name) is None else torch.cat([getattr(a, f.name), getattr(b, f.name)])
        for f in fields(ManifoldSample)
        if f.name != "eigenvalues"
    }
    merged = replace(a, **joined)
    return _take(merged, merged.values.abs().topk(min(k, len(merged))).indices)


def _take(sample: ManifoldSample, index: Tensor | slice) -> ManifoldSample:
    picked = {
        f.name: getattr(sample, f.name)
        if f.name == "eigenvalues" or getattr(sample, f.name) is None
        else getattr(sample, f.name)[index]
        for f in fields(ManifoldSample)
    }
    return ManifoldSample(**picked)
