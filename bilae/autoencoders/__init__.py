"""Autoencoder kinds (plain ``nn.Module``s: no Lightning, Hydra or W&B in here)."""

from bilae.autoencoders.base import Autoencoder
from bilae.autoencoders.bilinear import BilinearAutoencoder, Combined, Mixed, Ordered, Vanilla
from bilae.autoencoders.config import AutoencoderConfig
from bilae.autoencoders.topk import TopK

__all__ = [
    "Autoencoder",
    "AutoencoderConfig",
    "BilinearAutoencoder",
    "Combined",
    "Mixed",
    "Ordered",
    "TopK",
    "Vanilla",
]
