"""Brute-force oracles for the autoencoder maths: explicit d×d (or lifted (d+1)×(d+1)) matrices, explicit
prefix loops (tiny d only)."""

from __future__ import annotations

import torch
from torch import Tensor


def normalize(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def weights_g(coder, f: Tensor) -> Tensor:
    """g = f, or DᵀD f with a bottleneck."""
    return f if coder.down is None else f @ coder.down.T @ coder.down


def token_error(x: Tensor, g: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """‖x̂x̂ᵀ − Lᵀ diag(g) R‖²_F for one token (or ‖zzᵀ − L'ᵀ diag(g) R'‖²_F, lifted), built explicitly."""
    target = torch.outer(x, x)
    recon = left.T @ torch.diag(g) @ right
    return (target - recon).square().sum()


def hoyer(f: Tensor) -> Tensor:
    """Per-latent Hoyer density, computed literally from the definition."""
    n = f.shape[0]
    out = []
    for j in range(f.shape[1]):
        col = f[:, j]
        out.append((col.abs().sum() / col.norm() - 1.0) / (n**0.5 - 1.0))
    return torch.stack(out)


def bilinear_loss(coder, x: Tensor, mask: Tensor, scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, mse, density) by brute force: per-token explicit reconstructions, explicit prefix means."""
    return brute_force_loss(coder, normalize(x[mask]), coder.left, coder.right, scale)


def lift(tokens: Tensor) -> Tensor:
    """z = [1, x̂] for each row."""
    return torch.cat([torch.ones_like(tokens[:, :1]), tokens], dim=1)


def affine_loss(coder, x: Tensor, mask: Tensor, scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """The affine variant by brute force on z = [1, x̂]: z zᵀ − L'ᵀ diag(g) R', L' = [a, L], R' = [c, R]."""
    left = torch.cat([coder.left_bias[:, None], coder.left], dim=1)
    right = torch.cat([coder.right_bias[:, None], coder.right], dim=1)
    return brute_force_loss(coder, lift(normalize(x[mask])), left, right, scale)


def brute_force_loss(
    coder, tokens: Tensor, left: Tensor, right: Tensor, scale: float = 1.0
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, mse, density) of ``coder``'s kind on ``tokens`` (N, e) with atoms ``left``, ``right``."""
    f = (tokens @ left.T) * (tokens @ right.T)
    g = weights_g(coder, f)
    m = f.shape[1]
    plain, train = [], []
    for n in range(tokens.shape[0]):
        plain.append(token_error(tokens[n], g[n], left, right))
        if coder.ordered:
            prefixes = []
            for k in range(1, m + 1):
                target = torch.outer(tokens[n], tokens[n])
                recon = left[:k].T @ torch.diag(g[n, :k]) @ right[:k]
                prefixes.append((target - recon).square().sum())
            train.append(torch.stack(prefixes).mean())
    mse = torch.stack(plain).mean()
    recon = torch.stack(train).mean() if coder.ordered else mse
    rho = hoyer(f)
    if coder.ordered:
        # The density averaged over prefix lengths k: mean_k (1/k) Σ_{j≤k} ρ_j.
        density = torch.stack([rho[:k].mean() for k in range(1, m + 1)]).mean()
    else:
        density = rho.mean()
    return recon + coder.config.alpha * scale * density, mse, density
