"""Overlaps between latents through the bottleneck: G = D̂ᵀD̂, computed in row chunks so m = 16384 fits.

G[i] says which latents the bottleneck D mixes with latent i (MATH.md, "Analysis"). The full m×m matrix is
1 GiB in float32 at paper size, so everything here works on blocks of rows.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bilae.errors import UsageError

DEFAULT_CHUNK = 1024


@dataclass
class OverlapStats:
    """Per-latent statistics of the overlap rows G[i]."""

    ged: Tensor
    """(m,) generalised effective dimension (p = 4) of each row: ≈ number of big overlaps."""
    participation: Tensor
    """(m,) participation ratio (Σ|v|)²/Σv² of each row."""


def bottleneck(source: nn.Module | Tensor) -> Tensor:
    """The bottleneck D (b×m) of an autoencoder, or ``source`` itself when it is already a matrix.

    Raises:
        UsageError: the autoencoder has no bottleneck (only the mixed and combined kinds have one).
    """
    if isinstance(source, Tensor):
        if source.ndim != 2:
            raise UsageError(f"a bottleneck D must be a (b, m) matrix, got shape {tuple(source.shape)}")
        return source
    down = getattr(source, "down", None)
    if down is None:
        config = getattr(source, "config", None)
        kind = getattr(config, "kind", type(source).__name__)
        raise UsageError(
            f"a {kind!r} autoencoder has no bottleneck D, so it has no overlaps or composites; "
            "kinds with a bottleneck: 'mixed' or 'combined'"
        )
    if not isinstance(down, Tensor):
        raise UsageError(f"the bottleneck D must be a tensor, got {type(down).__name__}")
    return down.detach()


def latent_vectors(coder: nn.Module) -> tuple[Tensor, Tensor]:
    """The (m, d) ``left`` and ``right`` matrices of a bilinear autoencoder (detached).

    For an affine coder these are its lifted atoms L' = [a, L], R' = [c, R] (m, d + 1), which act on
    z = [1, x̂]: its forms, composites and manifolds are then (d+1)×(d+1) (MATH.md, "Affine kind").

    Raises:
        UsageError: the autoencoder is not bilinear (the topk baseline has no left/right).
    """
    left, right = getattr(coder, "left", None), getattr(coder, "right", None)
    if not isinstance(left, Tensor) or not isinstance(right, Tensor):
        kind = getattr(getattr(coder, "config", None), "kind", type(coder).__name__)
        raise UsageError(
            f"a {kind!r} autoencoder has no left/right latent vectors; bilinear kinds: "
            "'vanilla', 'ordered', 'mixed' or 'combined'"
        )
    atoms = getattr(coder, "atoms", None)
    if callable(atoms):
        left, right = atoms()
    return left.detach(), right.detach()


def unit_columns(down: Tensor) -> Tensor:
    """D̂: D with unit-norm columns (a zero column stays zero).  (b, m) → (b, m)"""
    norm = down.norm(dim=0, keepdim=True)
    return down / norm.clamp_min(torch.finfo(down.dtype).tiny)


def check_indices(indices: Sequence[int] | Tensor | int, m: int, what: str = "feature index") -> Tensor:
    """Latent indices as a 1-D long tensor; any index outside 0..m-1 is a UsageError naming the range."""
    idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
    bad = idx[(idx < 0) | (idx >= m)]
    if bad.numel():
        raise UsageError(f"{what} {bad[0].item()} is out of range; valid: 0 to {m - 1} (m = {m} latents)")
    return idx


def overlap_matrix(source: nn.Module | Tensor) -> Tensor:
    """The full overlap matrix G = D̂ᵀD̂ (m×m). Only for small m; use the chunked functions otherwise."""
    unit = unit_columns(bottleneck(source))
    return unit.T @ unit


def overlap_rows(source: nn.Module | Tensor, indices: Sequence[int] | Tensor | int) -> Tensor:
    """Selected rows G[indices] of the overlap matrix without building it.  → (n, m)"""
    unit = unit_columns(bottleneck(source))
    idx = check_indices(indices, unit.shape[1])
    return unit[:, idx].T @ unit


def overlap_chunks(source: nn.Module | Tensor, chunk: int = DEFAULT_CHUNK) -> Iterator[tuple[int, Tensor]]:
    """Yield ``(start, G[start:start + chunk])`` blocks of rows covering the whole overlap matrix."""
    if chunk <= 0:
        raise UsageError(f"chunk must be a positive number of rows, got {chunk}")
    unit = unit_columns(bottleneck(source))
    for start in range(0, unit.shape[1], chunk):
        yield start, unit[:, start : start + chunk].T @ unit


def generalized_effective_dimension(v: Tensor, p: float = 4.0) -> Tensor:
    """GED(v) = (Σ|v_k|^p)² / Σ|v_k|^{2p} over the last dimension (0 for a zero vector).  (..., n) → (...)"""
    a = v.abs()
    # Scaling by the max makes the ratio immune to under/overflow of the powers; GED is scale-invariant.
    a = a / a.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    num = a.pow(p).sum(-1).square()
    den = a.pow(2 * p).sum(-1)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(a.dtype).tiny), torch.zeros_like(den))


def participation_ratio(v: Tensor) -> Tensor:
    """(Σ|v_k|)² / Σv_k² over the last dimension (0 for a zero vector).  (..., n) → (...)"""
    num = v.abs().sum(-1).square()
    den = v.square().sum(-1)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(v.dtype).tiny), torch.zeros_like(den))


@torch.no_grad()
def overlap_stats(source: nn.Module | Tensor, chunk: int = DEFAULT_CHUNK, p: float = 4.0) -> OverlapStats:
    """GED and participation ratio of every row of G, chunk by chunk (never holds the m×m matrix)."""
    ged, participation = [], []
    for _, rows in overlap_chunks(source, chunk):
        ged.append(generalized_effective_dimension(rows, p))
        participation.append(participation_ratio(rows))
    return OverlapStats(ged=torch.cat(ged), participation=torch.cat(participation))
