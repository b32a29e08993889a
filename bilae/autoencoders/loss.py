"""The exact kernel-trick loss of the bilinear kinds (the reference formulation; see MATH.md).

For a token with normalised activation x̂, latents f and reconstruction weights g:
    error(g) = ‖x̂‖⁴ − 2 Σ_j g_j f_j + gᵀ K g,   K = (L Lᵀ) ∘ (R Rᵀ).
Summed over tokens the quadratic term is ⟨GᵀG, K⟩, so nothing of size N·d² (or even N·m²) is ever built:
memory is O(m²) for K and GᵀG.  With a bottleneck (g = DᵀD f = Dᵀ h) it is ⟨HᵀH, D K Dᵀ⟩, of size b².
Prefix-averaged kinds replace K by K ∘ W with W_ij = (m − max(i, j) + 1) / m and weight the cross term by
w_j = (m − j + 1) / m (1-indexed).
"""

from __future__ import annotations

import torch
from torch import Tensor


def kernel(left: Tensor, right: Tensor) -> Tensor:
    """K = (L Lᵀ) ∘ (R Rᵀ): inner products of the rank-1 decoder atoms l_j ⊗ r_j.  (m, d) × 2 → (m, m)."""
    return (left @ left.T) * (right @ right.T)


def prefix_weights(m: int, *, like: Tensor) -> Tensor:
    """w_j = (m − j + 1) / m for j = 1..m: the fraction of prefixes that contain latent j.  → (m,)"""
    return torch.arange(m, 0, -1, device=like.device, dtype=like.dtype) / m


def prefix_matrix(m: int, *, like: Tensor) -> Tensor:
    """W_ij = (m − max(i, j) + 1) / m = min(w_i, w_j): the fraction of prefixes that contain both.  → (m, m)"""
    w = prefix_weights(m, like=like)
    return torch.minimum(w[:, None], w[None, :])


def prefix_harmonics(m: int, *, like: Tensor) -> Tensor:
    """h_j = Σ_{k=j..m} 1/k: latent j's weight in the density averaged over prefix lengths.  → (m,)"""
    inv = 1.0 / torch.arange(1, m + 1, device=like.device, dtype=like.dtype)
    return inv.flip(0).cumsum(0).flip(0)


def hoyer_density(f: Tensor) -> Tensor:
    """Per-latent Hoyer density over tokens: (‖f_j‖₁/‖f_j‖₂ − 1)/(√N − 1) ∈ [0, 1].  (N, m) → (m,)

    A latent that never fires counts as perfectly sparse (0); with a single token there is no spread to
    measure, and every latent gets 0.
    """
    n = f.shape[0]
    l1 = f.abs().sum(0)
    l2 = f.square().sum(0).sqrt()
    alive = l2 > 0
    ratio = torch.where(alive, l1 / torch.where(alive, l2, torch.ones_like(l2)), torch.ones_like(l2))
    if n < 2:
        return torch.zeros_like(ratio)
    return (ratio - 1.0) / (n**0.5 - 1.0)


def reconstruction_sums(
    target: Tensor,
    f: Tensor,
    left: Tensor,
    right: Tensor,
    down: Tensor | None,
    *,
    ordered: bool,
) -> tuple[Tensor, Tensor]:
    """Token-summed reconstruction errors (plain, training) of one batch of real tokens.

    Args:
        target: (N,) ‖X‖² = ‖x̂‖⁴ per token (1 up to rounding).
        f: (N, m) latents.
        left, right: (m, d) encoder/decoder atoms.
        down: (b, m) bottleneck, or None (g = f).
        ordered: average over prefix lengths (ordered/combined) for the training term.

    Returns:
        ``(plain, train)``: Σ_n error(g_n) and the training reconstruction term summed over tokens (equal to
        ``plain`` unless ``ordered``).
    """
    k = kernel(left, right)
    if down is None:
        g, h, core = f, f, k
    else:
        h = f @ down.T  # (N, b)
        g = h @ down  # (N, m): DᵀD f
        core = down @ k @ down.T  # (b, b)
    hth = h.T @ h
    # Σ_j g_j f_j = fᵀDᵀD f = ‖h‖² (and ‖f‖² without a bottleneck, where h = f).
    plain = target.sum() - 2.0 * (h * h).sum() + (hth * core).sum()
    if not ordered:
        return plain, plain
    m = f.shape[1]
    weighted = k * prefix_matrix(m, like=k)
    if down is not None:
        weighted = down @ weighted @ down.T
    w = prefix_weights(m, like=f)
    train = target.sum() - 2.0 * (g * f * w).sum() + (hth * weighted).sum()
    return plain, train
