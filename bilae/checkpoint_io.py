"""Lightning checkpoints that are never half-written."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from bilae.autoencoders.checkpoint import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written beside their target, fsynced and renamed into place: never half-written.

    (Lightning stages checkpoints in $TMPDIR; on another filesystem its final move is an in-place copy.)
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        atomic_write(path, lambda handle: torch.save(checkpoint, handle))
