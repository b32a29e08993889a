"""The linear TopK SAE baseline of the paper's layer comparison, made comparable with the bilinear kinds."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bilae.autoencoders.base import Autoencoder, Metrics
from bilae.autoencoders.config import AutoencoderConfig
from bilae.autoencoders.loss import hoyer_density
from bilae.errors import UsageError


class TopK(Autoencoder, kind="topk"):
    """z = TopK(W_enc x̂ + b_enc), x̃ = W_decᵀ z + b_dec, trained on ‖x̂ − x̃‖².

    ``metrics["mse"]`` is the error in the product space, ‖x̂x̂ᵀ − x̃x̃ᵀ‖²_F, so it can sit beside the bilinear
    kinds' numbers; ``metrics["mse_x"]`` is the error in x space.
    """

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__(config)
        m, d = config.d_features, config.d_model
        self.encoder = nn.Parameter(torch.empty(m, d))
        self.decoder = nn.Parameter(torch.empty(m, d))
        self.encoder_bias = nn.Parameter(torch.zeros(m))
        self.decoder_bias = nn.Parameter(torch.zeros(d))
        nn.init.orthogonal_(self.decoder)
        with torch.no_grad():
            self.decoder.div_(self.decoder.norm(dim=-1, keepdim=True))
            self.encoder.copy_(self.decoder)

    @classmethod
    def prepare_config(cls, config: AutoencoderConfig) -> AutoencoderConfig:
        if config.bottleneck is not None:
            raise UsageError(f"the topk baseline has no bottleneck, got bottleneck={config.bottleneck}")
        if config.k > config.d_features:
            raise UsageError(f"topk k={config.k} exceeds the number of latents {config.d_features}")
        return config

    def _features(self, xhat: Tensor) -> Tensor:
        pre = xhat @ self.encoder.T + self.encoder_bias
        top = pre.topk(self.config.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())

    def decode(self, z: Tensor) -> Tensor:
        """x̃ = W_decᵀ z + b_dec.  (..., m) → (..., d)"""
        return z @ self.decoder + self.decoder_bias

    def _loss(self, xhat: Tensor, scale: float | Tensor) -> tuple[Tensor, Metrics, Tensor]:
        z = self._features(xhat)
        recon = self.decode(z)
        mse_x = (xhat - recon).square().sum(-1).mean()
        # ‖x̂x̂ᵀ − x̃x̃ᵀ‖²_F = ‖x̂‖⁴ − 2(x̂·x̃)² + ‖x̃‖⁴, without building d×d matrices.
        product = (
            xhat.square().sum(-1).square()
            - 2 * (xhat * recon).sum(-1).square()
            + recon.square().sum(-1).square()
        )
        density = hoyer_density(z).mean()
        loss = mse_x + self.config.alpha * scale * density
        metrics = {
            "mse": product.mean().detach(),
            "mse_x": mse_x.detach(),
            "recon": mse_x.detach(),
            "density": density.detach(),
        }
        return loss, metrics, z
