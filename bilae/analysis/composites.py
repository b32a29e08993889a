"""The composite atlas: statistics of B_k = Σ_j D_kj l_j r_jᵀ (symmetrised) for every bottleneck row k.

Low-rank trick. With support S of row k (s = |S| latents) and U = [L_S; R_S] (2s×d),
B_k = Uᵀ C U with C = [[0, diag(D_kS)/2], [diag(D_kS)/2, 0]] (2s×2s). A thin QR of Uᵀ = Q R_q (Q: d×2s with
orthonormal columns) gives B_k = Q (R_q C R_qᵀ) Qᵀ, so the non-zero eigenvalues of the d×d matrix B_k are those of
the symmetric 2s×2s matrix R_q C R_qᵀ — exact, and stable however ill-conditioned U is (no Gram matrix, no
inverse square root). Rows are sorted by support size and batched, padded with zero weights (which add exact
zero rows/columns to C and so only zero eigenvalues). Rows with s ≥ d/2 fall back to a direct d×d eigvalsh.

The support is {j : |D_kj| > tol · max_j |D_kj|}; entries below the tolerance are dropped from B_k in both paths,
so ``tol=0`` gives the exact composite of the non-zero entries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bilae.analysis.forms import QuadraticForm, quadratic_form
from bilae.analysis.overlap import bottleneck, check_indices, latent_vectors
from bilae.errors import UsageError

DEFAULT_TOL = 1e-3


@dataclass
class CompositeAtlas:
    """One entry per bottleneck row k (b rows)."""

    rank: Tensor
    """(b,) effective rank (Σ|λ|)²/Σλ² of B_k (0 for an empty row)."""
    support: Tensor
    """(b,) number of latents above the tolerance, ‖D_k‖₀."""
    importance: Tensor
    """(b,) Σλ² = ‖B_k‖²_F, normalised to mean 1 over rows."""
    captured: Tensor
    """(b,) (|λ₁|+|λ₂|+|λ₃|)/Σ|λ|: the share of the spectrum in the three largest eigenvalues."""
    top: Tensor
    """(b, 3) the three eigenvalues of largest |λ|, signed."""


def support_mask(down: Tensor, tol: float = DEFAULT_TOL) -> Tensor:
    """(b, m) bool: |D_kj| > tol · max_j |D_kj| (and non-zero)."""
    if not 0 <= tol < 1:
        raise UsageError(
            f"tol is relative to the largest |D_kj| of each row and must be in [0, 1), got {tol}"
        )
    a = down.abs()
    return (a > tol * a.amax(dim=1, keepdim=True)) & (a > 0)


def composite_form(source: nn.Module, row: int, tol: float = 0.0) -> QuadraticForm:
    """B_row (d×d, symmetrised) built directly from the latents in the row's support."""
    down = bottleneck(source)
    check_indices(row, down.shape[0], what="bottleneck row")
    left, right = latent_vectors(source)
    idx = support_mask(down[row : row + 1], tol)[0].nonzero().flatten()
    weights = down[row, idx].detach()
    return QuadraticForm(matrix=quadratic_form(left, right, idx, weights), indices=idx, weights=weights)


def lowrank_eigenvalues(left: Tensor, right: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    """Eigenvalues of Uᵀ C U via the 2s×2s matrix R_q C R_qᵀ, batched over rows.

    Args:
        left, right: (m, d) latent vectors.
        indices: (n, s) latent indices per row (padding may repeat any index).
        weights: (n, s) D_kS per row (0 where padded).

    Returns:
        (n, 2s) eigenvalues in ascending order (the other d − 2s eigenvalues of B_k are zero).
    """
    s = indices.shape[1]
    u_t = torch.cat([left[indices], right[indices]], dim=1).transpose(1, 2)  # (n, d, 2s)
    r = torch.linalg.qr(u_t, mode="r")[1]  # (n, min(d, 2s), 2s)
    a, b = r[..., :s], r[..., s:]
    half = a @ (weights[:, :, None] / 2 * b.transpose(1, 2))  # R_q C R_qᵀ = A W/2 Bᵀ + B W/2 Aᵀ
    return torch.linalg.eigvalsh(half + half.transpose(1, 2))


def direct_eigenvalues(left: Tensor, right: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    """Eigenvalues of the d×d B_k built explicitly, one row at a time.  → (n, d)"""
    rows = [quadratic_form(left, right, i, w) for i, w in zip(indices, weights)]
    return torch.stack([torch.linalg.eigvalsh(b) for b in rows]) if rows else left.new_zeros(0, left.shape[1])


def spectrum_stats(eigenvalues: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(rank, Σλ², captured, top-3 signed) of each row of eigenvalues (n, r); zero rows give zeros."""
    a = eigenvalues.abs()
    l1, l2 = a.sum(-1), eigenvalues.square().sum(-1)
    safe = torch.finfo(a.dtype).tiny
    rank = torch.where(l2 > 0, l1.square() / l2.clamp_min(safe), torch.zeros_like(l2))
    order = a.argsort(dim=-1, descending=True)[:, :3]
    top = eigenvalues.gather(1, order)
    top = torch.cat([top, top.new_zeros(top.shape[0], 3 - top.shape[1])], dim=1)
    captured = torch.where(l1 > 0, top.abs().sum(-1) / l1.clamp_min(safe), torch.zeros_like(l1))
    return rank, l2, captured, top


@torch.no_grad()
def composite_atlas(
    source: nn.Module | tuple[Tensor, Tensor, Tensor],
    tol: float = DEFAULT_TOL,
    batch: int = 256,
    dtype: torch.dtype = torch.float64,
) -> CompositeAtlas:
    """Statistics of every composite B_k of an autoencoder (or of ``(left, right, down)``).

    Args:
        source: a mixed/combined autoencoder, or the tensors ``(left (m, d), right (m, d), down (b, m))``.
        tol: support threshold relative to the largest |D_kj| of each row.
        batch: rows per batched QR/eigvalsh call (memory ≈ batch · d · 2s numbers).
        dtype: compute dtype (float64 keeps the statistics exact to ~1e-12).
    """
    left, right, down = _weights(source, dtype)
    if batch <= 0:
        raise UsageError(f"batch must be a positive number of rows, got {batch}")
    b, d = down.shape[0], left.shape[1]
    mask = support_mask(down, tol)
    support = mask.sum(1)
    eig_stats = [left.new_zeros(b) for _ in range(3)] + [left.new_zeros(b, 3)]
    for rows in _row_groups(support, batch, d):
        s = max(int(support[rows].max()), 1)
        idx = mask[rows].to(torch.uint8).topk(s, dim=1).indices  # support first, then zero-weight padding
        w = torch.where(mask[rows], down[rows], 0).gather(1, idx)
        path = lowrank_eigenvalues if 2 * s < d else direct_eigenvalues
        for out, value in zip(eig_stats, spectrum_stats(path(left, right, idx, w))):
            out[rows] = value
    rank, energy, captured, top = eig_stats
    importance = energy / energy.mean() if energy.mean() > 0 else energy
    return CompositeAtlas(rank=rank, support=support, importance=importance, captured=captured, top=top)


def _row_groups(support: Tensor, batch: int, d: int) -> list[Tensor]:
    """Rows sorted by support size, cut into batches; low-rank and direct rows never share a batch."""
    order = support.argsort()
    lowrank = order[2 * support[order] < d]
    direct = order[2 * support[order] >= d]
    groups = list(lowrank.split(batch)) + list(direct.split(max(1, min(batch, 8))))
    return [g for g in groups if g.numel()]


def _weights(
    source: nn.Module | tuple[Tensor, Tensor, Tensor], dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    if isinstance(source, tuple):
        left, right, down = source
    else:
        down = bottleneck(source)
        left, right = latent_vectors(source)
    if left.shape != right.shape or down.ndim != 2 or down.shape[1] != left.shape[0]:
        raise UsageError(
            f"composites need left, right (m, d) and down (b, m); got {tuple(left.shape)}, {tuple(right.shape)}, "
            f"{tuple(down.shape)}"
        )
    return left.detach().to(dtype), right.detach().to(dtype), down.detach().to(dtype)
