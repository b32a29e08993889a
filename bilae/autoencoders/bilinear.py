"""The bilinear kinds: latents f_j = (l_j·x̂)(r_j·x̂), tied decoder, exact kernel-trick loss (MATH.md).

vanilla  — g = f
ordered  — g = f, loss averaged over prefix lengths (a nested, importance-ordered dictionary)
mixed    — g = DᵀD f through a linear bottleneck D that clusters latents into manifolds
combined — mixed + ordered
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from bilae.autoencoders import fast_loss
from bilae.autoencoders import loss as L
from bilae.autoencoders.base import Autoencoder, Metrics
from bilae.autoencoders.config import AutoencoderConfig
from bilae.errors import UsageError


class BilinearAutoencoder(Autoencoder):
    """Shared body of the bilinear kinds; a kind only says whether it is ordered and has a bottleneck."""

    ordered: ClassVar[bool] = False
    mixing: ClassVar[bool] = False
    fast: bool = True
    """Use the fast exact loss (``fast_loss.py``); ``coder.fast = False`` selects the reference ``loss.py``."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__(config)
        m, d = config.d_features, config.d_model
        self.left = nn.Parameter(torch.empty(m, d))
        self.right = nn.Parameter(torch.empty(m, d))
        self.down = nn.Parameter(torch.empty(config.d_bottleneck, m)) if self.mixing else None
        self.reset_parameters()

    @classmethod
    def prepare_config(cls, config: AutoencoderConfig) -> AutoencoderConfig:
        if cls.mixing and config.bottleneck is None:
            config.bottleneck = 2
        if not cls.mixing and config.bottleneck is not None:
            raise UsageError(
                f"a {cls.kind} autoencoder has no bottleneck, got bottleneck={config.bottleneck}; "
                f"kinds with one: {', '.join(k for k, c in Autoencoder.kinds.items() if getattr(c, 'mixing', False))}"
            )
        return config

    def reset_parameters(self) -> None:
        """Orthogonal initialisation of left, right and down."""
        for weight in (self.left, self.right, self.down):
            if weight is not None:
                nn.init.orthogonal_(weight)

    def _features(self, xhat: Tensor) -> Tensor:
        return (xhat @ self.left.T) * (xhat @ self.right.T)

    def _loss(self, xhat: Tensor, scale: float | Tensor) -> tuple[Tensor, Metrics, Tensor]:
        n = xhat.shape[0]
        f = self._features(xhat)
        target = xhat.square().sum(-1).square()
        sums = fast_loss.reconstruction_sums if self.fast else L.reconstruction_sums
        plain, train = sums(target, f, self.left, self.right, self.down, ordered=self.ordered)
        density_per_latent = L.hoyer_density(f)
        if self.ordered:
            density = (density_per_latent * L.prefix_harmonics(f.shape[1], like=f)).mean()
        else:
            density = density_per_latent.mean()
        recon = train / n
        loss = recon + self.config.alpha * scale * density
        metrics = {"mse": (plain / n).detach(), "recon": recon.detach(), "density": density.detach()}
        return loss, metrics, f


class Vanilla(BilinearAutoencoder, kind="vanilla"):
    """Plain bilinear autoencoder: reconstruct x̂⊗x̂ from its own latents."""


class Ordered(BilinearAutoencoder, kind="ordered"):
    """Bilinear autoencoder whose loss averages over prefixes, so early latents matter most."""

    ordered = True


class Mixed(BilinearAutoencoder, kind="mixed"):
    """Bilinear autoencoder with a linear bottleneck D: reconstruction weights g = DᵀD f."""

    mixing = True


class Combined(BilinearAutoencoder, kind="combined"):
    """Mixed and ordered at once."""

    ordered = True
    mixing = True
