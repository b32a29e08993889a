"""bilae: bilinear autoencoders on language-model activations."""

from bilae.autoencoders import Autoencoder, AutoencoderConfig
from bilae.errors import BilaeError, CheckpointError, DataError, UsageError

__all__ = ["Autoencoder", "AutoencoderConfig", "BilaeError", "CheckpointError", "DataError", "UsageError"]
__version__ = "0.1.0"
