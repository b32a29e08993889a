"""The seed notebook's helper functions (its ``from utils.functions import *``), over the last dimension.

``from bilae.analysis.functions import *`` gives the names the notebook and the reference's ``utils/functions``
use: :func:`generalized_effective_dimension`, :func:`effective_dimension`, :func:`inverted_participation_ratio`,
:func:`hoyer_density` and :func:`hoyer_sparsity` (MATH.md, "Analysis" and "Sparsity regulariser").
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bilae.analysis.overlap import generalized_effective_dimension, participation_ratio

__all__ = [
    "effective_dimension",
    "generalized_effective_dimension",
    "hoyer_density",
    "hoyer_sparsity",
    "inverted_participation_ratio",
]


def effective_dimension(v: Tensor, dim: int = -1) -> Tensor:
    """Participation ratio (Σ|v_k|)² / Σv_k² along ``dim``: about how many entries are big.  (..., n) → (...)"""
    return participation_ratio(v.movedim(dim, -1))


def inverted_participation_ratio(v: Tensor, dim: int = -1) -> Tensor:
    """Σv_k⁴ / (Σv_k²)² along ``dim``: 1 for one non-zero entry, 1/n for n equal ones (0 for a zero vector)."""
    sq = v.movedim(dim, -1).square()
    den = sq.sum(-1).square()
    return torch.where(den > 0, sq.square().sum(-1) / den.clamp_min(torch.finfo(sq.dtype).tiny), 0.0)


def hoyer_density(v: Tensor, dim: int = -1) -> Tensor:
    """(‖v‖₁/‖v‖₂ − 1) / (√n − 1) along ``dim``: 0 for one non-zero entry, 1 for n equal ones.  (..., n) → (...)

    A zero vector counts as sparse (0); ``n = 1`` is 0 too (nothing to spread over).
    """
    v = v.movedim(dim, -1)
    n = v.shape[-1]
    if n < 2:
        return torch.zeros(v.shape[:-1], dtype=v.dtype, device=v.device)
    l2 = v.norm(dim=-1)
    ratio = torch.where(l2 > 0, v.abs().sum(-1) / l2.clamp_min(torch.finfo(v.dtype).tiny), 1.0)
    return (ratio - 1) / (math.sqrt(n) - 1)


def hoyer_sparsity(v: Tensor, dim: int = -1) -> Tensor:
    """1 − :func:`hoyer_density`: 1 for one non-zero entry, 0 for n equal ones."""
    return 1 - hoyer_density(v, dim)
