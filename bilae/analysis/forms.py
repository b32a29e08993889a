"""Quadratic forms of latent sets ("density matrix", "metric tensor") and their spectra.

M = Σ_{k∈S} w_k l_k r_kᵀ, symmetrised. Its eigen-decomposition says how many dimensions the manifold composed
from the latents in S really has (MATH.md, "Analysis").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from bilae.analysis.overlap import check_indices, latent_vectors, overlap_rows
from bilae.autoencoders import Autoencoder
from bilae.errors import UsageError


@dataclass
class Spectrum:
    """Eigen-decomposition of a symmetric form, ordered by |λ| descending."""

    eigenvalues: Tensor
    """(d,) signed eigenvalues, largest magnitude first."""
    eigenvectors: Tensor
    """(d, d) unit eigenvectors as columns, in the same order."""

    def top(self, n: int = 3) -> Tensor:
        """The ``n`` eigenvectors of largest |λ| as columns.  → (d, n)"""
        return self.eigenvectors[:, :n]


@dataclass
class QuadraticForm:
    """A symmetrised form together with the latents and weights it was built from."""

    matrix: Tensor
    """(d, d) symmetric M."""
    indices: Tensor
    """(s,) latent indices S."""
    weights: Tensor
    """(s,) weights w."""


def symmetrize(matrix: Tensor) -> Tensor:
    """(M + Mᵀ) / 2 of a square matrix; anything else is a UsageError."""
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise UsageError(f"a quadratic form must be a square (d, d) matrix, got shape {tuple(matrix.shape)}")
    return (matrix + matrix.T) / 2


def quadratic_form(
    left: Tensor,
    right: Tensor,
    indices: Sequence[int] | Tensor,
    weights: Sequence[float] | Tensor | None = None,
) -> Tensor:
    """M = Σ_{k∈S} w_k l_k r_kᵀ, symmetrised (weights default to 1).  left, right: (m, d) → (d, d)"""
    idx = check_indices(indices, left.shape[0])
    w = (
        torch.ones(len(idx), dtype=left.dtype)
        if weights is None
        else torch.as_tensor(weights, dtype=left.dtype)
    )
    if w.shape != idx.shape:
        raise UsageError(f"got {w.numel()} weights for {idx.numel()} latents; give one weight per latent")
    w = w.to(left.device)
    return symmetrize(left[idx].T @ (w[:, None] * right[idx]))


def spectrum(matrix: Tensor) -> Spectrum:
    """Eigen-decomposition (eigh) of the symmetrised ``matrix``, sorted by |λ| descending."""
    values, vectors = torch.linalg.eigh(symmetrize(matrix))
    order = values.abs().argsort(descending=True)
    return Spectrum(eigenvalues=values[order], eigenvectors=vectors[:, order])


WEIGHTS = ("uniform", "overlap", "abs_overlap")
"""How a latent's form weighs its top-k overlapping latents S (``weights=``):

- ``uniform``: every weight 1, the seed notebook's ``einsum(coder.left[inds], coder.right[inds], ...)`` (default);
- ``overlap``: the signed overlaps G[i, S] (MATH.md's "weights G[i, S]");
- ``abs_overlap``: their magnitudes |G[i, S]| (the reference's figure code).
"""


def check_weights(weights: str) -> str:
    """``weights`` if it names a weighting in :data:`WEIGHTS`, else a UsageError listing them."""
    if weights not in WEIGHTS:
        raise UsageError(f"unknown form weights {weights!r}; valid: {', '.join(WEIGHTS)}")
    return weights


@torch.no_grad()
def latent_form(coder: Autoencoder, index: int, k: int = 5, weights: str = "uniform") -> QuadraticForm:
    """The form of latent ``index``: S = top-``k`` latents by |G[index]|, weighted as ``weights`` says.

    The default (``"uniform"``) is the seed notebook's unweighted sum of l_k r_kᵀ over S; ``"overlap"`` weighs
    each by G[index, k] and ``"abs_overlap"`` by |G[index, k]| (see :data:`WEIGHTS`). Affine coders give lifted
    (d+1)×(d+1) forms on z = [1, x̂].

    Raises:
        UsageError: an index outside 0..m-1, a bad ``k`` or ``weights``, or a kind without a bottleneck.
    """
    check_weights(weights)
    m = coder.config.d_features
    check_indices(index, m)
    if not 1 <= k <= m:
        raise UsageError(f"k must be between 1 and the number of latents {m}, got {k}")
    row = overlap_rows(coder, [index])[0]
    indices = row.abs().topk(k).indices
    w = {"uniform": torch.ones_like(row[indices]), "overlap": row[indices], "abs_overlap": row[indices].abs()}
    left, right = latent_vectors(coder)
    matrix = quadratic_form(left, right, indices, w[weights].to(left.dtype))
    return QuadraticForm(matrix=matrix, indices=indices, weights=w[weights])
