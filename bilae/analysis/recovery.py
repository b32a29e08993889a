"""Recovering planted manifolds (``data=planted``, :mod:`bilae.synthetic`) from an autoencoder's weights.

Candidates are the coder's composites B_k (one per bottleneck row) and latent clusters (each latent's form over its
top overlapping latents, uniform weights; a latent's own form sym(l rᵀ) without a bottleneck). A planted manifold
whose linear span has k dimensions (its subspace; plus the offset direction when it is off the origin) is matched to
the candidate whose k eigenvectors of largest |λ| span it best: the score is the smallest principal-angle cosine
between the two k-dim subspaces (1: spanned exactly). Lifted (affine) forms
are read on their quadratic block, the part acting on x̂ (an off-centre circle (x−c)ᵀP(x−c) has quadratic part P).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import plotly.graph_objects as go
import torch
from torch import Tensor

from bilae.analysis.compare import principal_cosines
from bilae.analysis.overlap import latent_vectors, overlap_rows
from bilae.autoencoders import Autoencoder
from bilae.errors import UsageError
from bilae.synthetic import PlantedManifolds

CHUNK = 256
SIZES = (2, 3, 4, 6, 8)
"""Cluster sizes tried per latent."""


@dataclass
class Recovery:
    """The best candidate of each planted manifold."""

    names: list[str]
    """``circle 0``, ``sphere 5 (offset)``, …"""
    cosines: list[Tensor]
    """(k,) principal-angle cosines of each manifold with its best candidate, descending."""
    candidates: list[str]
    """The best candidate of each: ``composite 12`` or ``cluster of latent 40``."""

    @property
    def scores(self) -> Tensor:
        """(n,) the smallest cosine of each manifold."""
        return torch.stack([c.min() for c in self.cosines])

    def recovered(self, threshold: float = 0.9) -> float:
        """The share of planted manifolds whose score reaches ``threshold``."""
        return float((self.scores >= threshold).float().mean())


@torch.no_grad()
def candidate_forms(coder: Autoencoder, sizes: Sequence[int] = SIZES) -> tuple[Tensor, list[str]]:
    """The coder's composites, latents and latent clusters as symmetric (n, d, d) forms on x̂, and their names.

    A latent's clusters are its top-s latents by |G[i]| (s in ``sizes``, uniform weights; itself included).
    """
    left, right = (t.double() for t in latent_vectors(coder))
    m, d = left.shape[0], int(coder.config.d_model)
    forms, names = [torch.einsum("md,me->mde", left, right)], [f"latent {i}" for i in range(m)]
    down = getattr(coder, "down", None)
    if down is not None:
        down = down.detach().double()
        forms.append(torch.einsum("km,md,me->kde", down, left, right))
        names += [f"composite {k}" for k in range(len(down))]
        for start in range(0, m, CHUNK):
            rows = overlap_rows(coder, list(range(start, min(start + CHUNK, m))))
            order = rows.abs().argsort(dim=1, descending=True)
            for size in sorted({min(s, m) for s in sizes}):
                idx = order[:, :size]  # (c, size)
                forms.append(torch.einsum("ckd,cke->cde", left[idx], right[idx]))
                names += [f"top-{size} cluster of latent {i}" for i in range(start, start + len(idx))]
                forms.append(span(left[idx], right[idx]))
                names += [
                    f"span of the top-{size} cluster of latent {i}" for i in range(start, start + len(idx))
                ]
    stacked = torch.cat(forms)[:, -d:, -d:]  # the quadratic block of lifted forms
    return (stacked + stacked.transpose(1, 2)) / 2, names


def span(left: Tensor, right: Tensor) -> Tensor:
    """Σ_j (l_j l_jᵀ + r_j r_jᵀ) of each set of latents: its eigenvectors span the directions the set reads.
    (c, s, d) → (c, d, d)"""
    return torch.einsum("ckd,cke->cde", left, left) + torch.einsum("ckd,cke->cde", right, right)


def top_eigenvectors(forms: Tensor, k: int) -> Tensor:
    """The ``k`` eigenvectors of largest |λ| of each symmetric form.  (n, d, d) → (n, d, k)"""
    values, vectors = torch.linalg.eigh(forms)
    order = values.abs().argsort(dim=-1, descending=True)[:, None, :k].expand(-1, forms.shape[1], -1)
    return vectors.gather(2, order)


def recover(truth: PlantedManifolds, forms: Tensor, names: list[str]) -> Recovery:
    """Match each planted manifold to the candidate form whose top eigenvectors span its subspace best."""
    spans = truth.spans()
    tops = {k: top_eigenvectors(forms, k) for k in {b.shape[1] for b in spans}}
    cosines, best = [], []
    for basis in spans:
        k = basis.shape[1]
        found = torch.stack([principal_cosines(v, basis.to(v)) for v in tops[k]])  # (n, k)
        i = int(found.min(dim=1).values.argmax())
        cosines.append(found[i])
        best.append(names[i])
    return Recovery(truth.names(), cosines, best)


def recover_planted(coder: Autoencoder, truth: PlantedManifolds, sizes: Sequence[int] = SIZES) -> Recovery:
    """:func:`recover` over all of ``coder``'s candidate forms."""
    if int(coder.config.d_model) != truth.features.shape[1]:
        raise UsageError(
            f"the planted manifolds have d_model {truth.features.shape[1]}, but the autoencoder has "
            f"{coder.config.d_model}; analyse the coder trained on them"
        )
    forms, names = candidate_forms(coder, sizes)
    return recover(truth, forms, names)


def recovery_figure(found: Recovery, threshold: float = 0.9) -> go.Figure:
    """The smallest principal cosine of each planted manifold with its best candidate, and the threshold."""
    fig = go.Figure(go.Bar(x=found.names, y=found.scores.tolist(), hovertext=found.candidates))
    fig.add_hline(y=threshold, line_dash="dash")
    fig.update_layout(
        title=f"Planted manifolds: {found.recovered(threshold):.0%} recovered at cosine ≥ {threshold:g}",
        yaxis_title="smallest principal cosine", yaxis_range=[0, 1.05], template="plotly_white",
    )  # fmt: skip
    return fig
