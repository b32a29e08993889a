"""Lightning checkpoints that are never half-written, and an exception checkpoint that never saves a wrong model."""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from bilae.autoencoders.checkpoint import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written beside their target, fsynced and renamed into place: never half-written.

    (Lightning stages checkpoints in $TMPDIR; on another filesystem its final move is an in-place copy.)
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        atomic_write(path, lambda handle: torch.save(checkpoint, handle))


class ExceptionCheckpoint(Checkpoint):
    """Save a checkpoint when a run stops on an exception (SIGTERM, Ctrl+C, a non-finite loss), but only of a model
    that was actually training.

    A run that fails before training starts (a resume whose restore failed, a shape mismatch, a bad value found in
    setup) saves nothing, so the checkpoint it was resuming from (often this very file) stays byte-identical.

    Lightning's ``OnExceptionCheckpoint`` is not the base on purpose: with one of those among the callbacks, Lightning
    turns ``fit(ckpt_path=None)`` into ``ckpt_path="last"``, warns twice, and a fresh run in a directory that holds a
    checkpoint silently resumes from it. bilae resumes only when asked (``ckpt_path=...``).
    """

    def __init__(self, dirpath: Any, filename: str = "interrupted") -> None:
        super().__init__()
        self.dirpath, self.filename = dirpath, filename
        self.training = False

    @property
    def ckpt_path(self) -> str:
        """The checkpoint file: ``<dirpath>/<filename>.ckpt``."""
        return os.path.join(self.dirpath, self.filename + ".ckpt")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.training = True  # the restore (if any) succeeded and the weights are the run's own

    def on_exception(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if self.training:
            trainer.save_checkpoint(self.ckpt_path)

    def teardown(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        # A run that ends normally needs no exception checkpoint.
        trainer.strategy.remove_checkpoint(self.ckpt_path)
