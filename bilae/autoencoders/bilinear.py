"""The bilinear kinds: latents f_j = (l_j·x̂)(r_j·x̂), tied decoder, exact kernel-trick loss (MATH.md).

Each kind has an affine variant (``affine=True``): f_j = (l_j·x̂ + a_j)(r_j·x̂ + c_j), which is the same kind on
the lifted input z = [1, x̂] with atoms l'_j = [a_j, l_j], r'_j = [c_j, r_j] and target z⊗z.

vanilla  — g = f
ordered  — g = f, loss averaged over prefix lengths (a nested, importance-ordered dictionary)
mixed    — g = DᵀD f through a linear bottleneck D that clusters latents into manifolds
combined — mixed + ordered
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from bilae.autoencoders import fast_loss, streaming_loss
from bilae.autoencoders import loss as L
from bilae.autoencoders.base import Autoencoder, Metrics
from bilae.autoencoders.config import AutoencoderConfig
from bilae.errors import UsageError


class BilinearAutoencoder(Autoencoder):
    """Shared body of the bilinear kinds; a kind only says whether it is ordered and has a bottleneck."""

    ordered: ClassVar[bool] = False
    mixing: ClassVar[bool] = False
    supports_affine = True
    fast: bool = True
    """Use the fast exact loss (blocked ``fast_loss.py`` or ``streaming_loss.py`` as ``config.loss_memory`` says);
    ``coder.fast = False`` selects the reference ``loss.py``."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__(config)
        m, d = config.d_features, config.d_model
        self.left = nn.Parameter(torch.empty(m, d))
        self.right = nn.Parameter(torch.empty(m, d))
        self.down = nn.Parameter(torch.empty(config.d_bottleneck, m)) if self.mixing else None
        # Only affine coders own biases, so published non-affine checkpoints keep exactly left/right/down.
        self.left_bias = nn.Parameter(torch.empty(m)) if config.affine else None
        self.right_bias = nn.Parameter(torch.empty(m)) if config.affine else None
        self.reset_parameters()

    @classmethod
    def accept_published(cls, config: AutoencoderConfig) -> AutoencoderConfig:
        # The reference's training sweep passes a bottleneck to every kind; it means nothing without one.
        if not cls.mixing and config.bottleneck is not None:
            config.extra["ignored_bottleneck"] = config.bottleneck
            config.bottleneck = None
        return config

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
        """Orthogonal initialisation of left, right and down; zero biases (as the reference's v1)."""
        for weight in (self.left, self.right, self.down):
            if weight is not None:
                nn.init.orthogonal_(weight)
        for bias in (self.left_bias, self.right_bias):
            if bias is not None:
                nn.init.zeros_(bias)

    def atoms(self) -> tuple[Tensor, Tensor]:
        """The decoder atoms the loss sees: (L, R), or for affine coders the lifted L' = [a, L], R' = [c, R].

        Shapes (m, d), or (m, d + 1) when affine; pair them with :meth:`lift`.
        """
        if self.left_bias is None or self.right_bias is None:
            return self.left, self.right
        left = torch.cat([self.left_bias[:, None], self.left], 1)
        return left, torch.cat([self.right_bias[:, None], self.right], 1)

    def lift(self, xhat: Tensor) -> Tensor:
        """z = [1, x̂] (..., d + 1) for affine coders, else x̂ itself: the input that :meth:`atoms` act on."""
        if not self.affine:
            return xhat
        return torch.cat([torch.ones_like(xhat[..., :1]), xhat], -1)

    def _features(self, xhat: Tensor) -> Tensor:
        left, right = xhat @ self.left.T, xhat @ self.right.T
        if self.left_bias is not None and self.right_bias is not None:
            left, right = left + self.left_bias, right + self.right_bias
        return left * right

    def _exact_sums(self, f: Tensor) -> streaming_loss.Sums:
        """Blocked or streaming loss per ``config.loss_memory``; ``auto`` decides (and logs) once per device."""
        key = (self.config.loss_memory, f.shape[1], f.device)
        if getattr(self, "_loss_choice", (None, ""))[0] != key:
            size = fast_loss.compute_dtype(f).itemsize
            self._loss_choice = (key, streaming_loss.resolve(*key, itemsize=size, name=self.config.name))
        return streaming_loss.sums_for(self._loss_choice[1])

    def _loss(self, xhat: Tensor, scale: float | Tensor) -> tuple[Tensor, Metrics, Tensor]:
        n = xhat.shape[0]
        f = self._features(xhat)
        # Affine coders are their kind on z = [1, x̂]: lifted atoms, target ‖z‖⁴ (= 4 for unit x̂).
        left, right = self.atoms()
        target = self.lift(xhat).square().sum(-1).square()
        sums = self._exact_sums(f) if self.fast else L.reconstruction_sums
        plain, train = sums(target, f, left, right, self.down, ordered=self.ordered)
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
