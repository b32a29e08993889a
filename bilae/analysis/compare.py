"""Comparing two bilinear autoencoders from their weights (MATH.md, "Comparing two autoencoders").

- Input subspaces: the top-r eigenvectors of Σ_j (l_j l_jᵀ + r_j r_jᵀ) = LᵀL + RᵀR of each coder, compared by the
  cosines of their principal angles (1: the same direction in both; r cosines of 1: the same r-dim subspace).
- Latents: for each latent of A, the best |cosine| between its symmetrised form sym(l rᵀ) and those of B's latents,
  where ⟨sym(l rᵀ), sym(l' r'ᵀ)⟩_F = ((l·l')(r·r') + (l·r')(r·l')) / 2 needs no d×d matrix; B's latents are
  visited in chunks, so the m_A × m_B similarity matrix never exists either. The absolute value is taken
  because flipping the sign of l alone flips a form's sign but not the reconstruction (f_j and its atom flip).

Affine coders are compared on their lifted atoms (a plain coder's atoms get zero biases), their input subspaces
on L and R.
"""

from __future__ import annotations

from dataclasses import dataclass

import plotly.graph_objects as go
import torch
from torch import Tensor, nn

from bilae.analysis.overlap import latent_vectors
from bilae.errors import UsageError

DEFAULT_CHUNK = 1024


@dataclass
class Comparison:
    """How two autoencoders A and B relate."""

    cosines: Tensor
    """(r,) principal-angle cosines between the input subspaces, descending."""
    best: Tensor
    """(m_A,) each latent of A: its best |cosine| of symmetrised forms among B's latents."""
    match: Tensor
    """(m_A,) the latent of B achieving it."""

    @property
    def mean_best(self) -> float:
        """The mean over A's latents of their best match."""
        return float(self.best.mean())


def input_subspace(left: Tensor, right: Tensor, rank: int) -> Tensor:
    """The ``rank`` eigenvectors of LᵀL + RᵀR with the largest eigenvalues, as columns.  (m, d) → (d, rank)"""
    d = left.shape[1]
    if not 1 <= rank <= d:
        raise UsageError(f"rank must be between 1 and d_model {d}, got {rank}")
    gram = left.T @ left + right.T @ right
    _, vectors = torch.linalg.eigh(gram)
    return vectors[:, -rank:].flip(-1)


def principal_cosines(a: Tensor, b: Tensor) -> Tensor:
    """Cosines of the principal angles between the column spans of ``a`` and ``b`` (d, r), descending.  → (r,)"""
    if a.ndim != 2 or a.shape != b.shape:
        raise UsageError(
            f"two (d, r) bases of one shape are needed, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    qa, qb = torch.linalg.qr(a).Q, torch.linalg.qr(b).Q
    return torch.linalg.svdvals(qa.T @ qb).clamp(0.0, 1.0)


def form_norms(left: Tensor, right: Tensor) -> Tensor:
    """‖sym(l rᵀ)‖_F of each latent: sqrt(((l·l)(r·r) + (l·r)²) / 2).  (m, d) → (m,)"""
    ll, rr, lr = left.square().sum(-1), right.square().sum(-1), (left * right).sum(-1)
    return ((ll * rr + lr.square()) / 2).clamp_min(0).sqrt()


def form_similarity(left_a: Tensor, right_a: Tensor, left_b: Tensor, right_b: Tensor) -> Tensor:
    """Cosines of the symmetrised forms of A's latents with B's.  (m_A, d), (m_B, d) → (m_A, m_B)"""
    inner = ((left_a @ left_b.T) * (right_a @ right_b.T) + (left_a @ right_b.T) * (right_a @ left_b.T)) / 2
    norms = form_norms(left_a, right_a)[:, None] * form_norms(left_b, right_b)[None, :]
    return inner / norms.clamp_min(torch.finfo(inner.dtype).tiny)


def best_matches(
    left_a: Tensor, right_a: Tensor, left_b: Tensor, right_b: Tensor, chunk: int = DEFAULT_CHUNK
) -> tuple[Tensor, Tensor]:
    """For each latent of A, the best |cosine| of forms among B's latents and which latent gives it.

    B's latents are taken ``chunk`` at a time, so memory is m_A × chunk.  → (m_A,), (m_A,)
    """
    if chunk <= 0:
        raise UsageError(f"chunk must be a positive number of latents, got {chunk}")
    best = left_a.new_full((left_a.shape[0],), -1.0)
    match = torch.zeros(left_a.shape[0], dtype=torch.long, device=left_a.device)
    for start in range(0, left_b.shape[0], chunk):
        part = slice(start, start + chunk)
        values, where = form_similarity(left_a, right_a, left_b[part], right_b[part]).abs().max(-1)
        better = values > best
        best, match = torch.where(better, values, best), torch.where(better, where + start, match)
    return best, match


@torch.no_grad()
def compare_coders(a: nn.Module, b: nn.Module, rank: int = 16, chunk: int = DEFAULT_CHUNK) -> Comparison:
    """Compare autoencoder ``a`` with ``b`` (same d_model): subspace cosines at ``rank`` and latent matches.

    Raises:
        UsageError: the coders differ in d_model, or one is not bilinear.
    """
    (la, ra), (lb, rb) = _plain(a), _plain(b)
    if la.shape[1] != lb.shape[1]:
        raise UsageError(
            f"cannot compare autoencoders of d_model {la.shape[1]} and {lb.shape[1]}; both must read the same "
            "model's activations"
        )
    rank = min(rank, la.shape[1])
    cosines = principal_cosines(input_subspace(la, ra, rank), input_subspace(lb, rb, rank))
    (la, ra), (lb, rb) = _lifted_pair(a, b)
    best, match = best_matches(la, ra, lb, rb, chunk)
    return Comparison(cosines=cosines, best=best, match=match)


def _plain(coder: nn.Module) -> tuple[Tensor, Tensor]:
    """The float64 (m, d) left and right matrices, without an affine coder's biases."""
    left, right = latent_vectors(coder)
    config = getattr(coder, "config", None)
    d = int(getattr(config, "d_model", left.shape[1]))
    return left[:, -d:].double(), right[:, -d:].double()


def _lifted_pair(a: nn.Module, b: nn.Module) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Both coders' atoms in one space: lifted (zero biases for a plain coder) when either is affine."""
    atoms = [tuple(t.double() for t in latent_vectors(c)) for c in (a, b)]
    width = max(atoms[0][0].shape[1], atoms[1][0].shape[1])
    lifted = [tuple(_pad(t, width) for t in pair) for pair in atoms]
    return (lifted[0][0], lifted[0][1]), (lifted[1][0], lifted[1][1])


def _pad(atoms: Tensor, width: int) -> Tensor:
    return atoms if atoms.shape[1] == width else torch.cat([atoms.new_zeros(len(atoms), 1), atoms], 1)


def subspace_figure(cosines: Tensor, title: str = "Input subspaces") -> go.Figure:
    """Principal-angle cosines against their index (all 1: the same subspace)."""
    y = cosines.tolist()
    fig = go.Figure(go.Scatter(x=list(range(1, len(y) + 1)), y=y, mode="lines+markers"))
    fig.update_layout(
        title=f"{title}: mean cosine {sum(y) / len(y):.3f} over {len(y)} directions",
        xaxis_title="principal angle", yaxis_title="cosine", yaxis_range=[0, 1.05], template="plotly_white",
    )  # fmt: skip
    return fig


def matches_figure(best: Tensor, title: str = "Best match of each latent") -> go.Figure:
    """Histogram of each latent's best |cosine| in the other coder, with the mean in the title."""
    fig = go.Figure(go.Histogram(x=best.tolist(), xbins={"start": 0, "end": 1.0001, "size": 0.02}))
    fig.update_layout(
        title=f"{title}: mean {float(best.mean()):.3f}", xaxis_title="best |cosine| of symmetrised forms",
        yaxis_title="latents", xaxis_range=[0, 1], template="plotly_white",
    )  # fmt: skip
    return fig
