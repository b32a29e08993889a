"""Test-only callbacks that inject faults at exact steps, so no test races a wall clock.

Used through Hydra from a subprocess, e.g. ``+callbacks.fault._target_=tests.support.faults.KillAt
+callbacks.fault.step=7``. Lightning runs checkpoint callbacks after every other callback, so a kill "at step N"
(after optimiser step N) happens before step N's checkpoint is written: the last checkpoint is step N - 1.
"""

from __future__ import annotations

import errno
import io
import os
import signal as signals
from pathlib import Path
from typing import Any

import lightning as L
import torch


class KillAt(L.Callback):
    """Send ``signal`` to this process right after optimiser step ``step``, or halfway through writing a checkpoint.

    Args:
        step: the optimiser step (``trainer.global_step``) at which to fire, once.
        signal: ``SIGKILL`` (the process dies at once) or ``SIGTERM`` (Lightning stops at the next batch).
        during: ``"step"`` (after the step), or ``"write"``: while the checkpoint of ``step`` named ``file`` is
            being written through the trainer's own checkpoint IO, after half of its bytes reached the disk.
        file: the checkpoint file whose write is interrupted (``during="write"``).
        on_resume: also fire in a run resumed from a checkpoint (``False``: a resume that re-applies the run's
            own overrides, ``+callbacks.fault...`` included, survives the fault that stopped the first attempt).
    """

    def __init__(
        self, step: int, signal: str = "SIGKILL", during: str = "step", file: str = "last.ckpt",
        on_resume: bool = True,
    ) -> None:  # fmt: skip
        if during not in ("step", "write"):
            raise ValueError(f"during must be 'step' or 'write', got {during!r}")
        self.step, self.signal, self.during, self.file = step, getattr(signals, signal), during, file
        self.on_resume = on_resume
        self.fired = False

    def fire(self) -> None:
        self.fired = True
        os.kill(os.getpid(), self.signal)

    def armed(self, trainer: L.Trainer) -> bool:
        return not self.fired and (self.on_resume or trainer.ckpt_path is None)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.during == "step" and self.armed(trainer) and trainer.global_step == self.step:
            self.fire()

    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        if self.during != "write":
            return
        io_plugin = trainer.strategy.checkpoint_io
        original = io_plugin.save_checkpoint

        def save_checkpoint(checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
            if (
                checkpoint.get("global_step") == self.step
                and Path(path).name == self.file
                and self.armed(trainer)
            ):
                self.write_half_then_fire()
            original(checkpoint, path, storage_options)

        io_plugin.save_checkpoint = save_checkpoint  # type: ignore[method-assign]

    def write_half_then_fire(self) -> None:
        """Make the next ``torch.save`` (the one inside bilae's atomic write) stop halfway and fire."""
        real_save = torch.save

        def half(obj: Any, handle: Any, *args: Any, **kwargs: Any) -> None:
            buffer = io.BytesIO()
            real_save(obj, buffer)
            data = buffer.getvalue()
            handle.write(data[: len(data) // 2])
            handle.flush()
            os.fsync(handle.fileno())
            self.fire()

        torch.save = half  # type: ignore[assignment]


class PoisonActivations(L.Callback):
    """From optimiser step ``step`` on, every activation batch is NaN (a broken layer or an fp16 overflow)."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.poisoned = False

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        # A batch becomes activations when it reaches the device, before on_train_batch_start: poisoning the
        # source after the step before makes the batch of step ``step`` the first NaN one.
        if trainer.global_step < self.step or self.poisoned:
            return
        source = trainer.datamodule.activations  # type: ignore[attr-defined]
        harvest = source.activations

        def poisoned(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            acts, mask = harvest(batch)
            return torch.full_like(acts, float("nan")), mask

        source.activations = poisoned
        self.poisoned = True


class DiskFull(L.Callback):
    """The disk fills up: at optimiser step ``step`` while writing a checkpoint, or while exporting at fit end.

    The write fails with ``ENOSPC`` after half of the bytes went through bilae's own atomic writer.
    """

    def __init__(self, during: str = "checkpoint", step: int = 0) -> None:
        if during not in ("checkpoint", "export"):
            raise ValueError(f"during must be 'checkpoint' or 'export', got {during!r}")
        self.during, self.step = during, step
        self.fired = False

    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        if self.during != "checkpoint":
            return
        io_plugin = trainer.strategy.checkpoint_io
        original = io_plugin.save_checkpoint

        def save_checkpoint(checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
            if checkpoint.get("global_step") == self.step and not self.fired:
                self.fired = True  # once: the exception checkpoint written right after finds space again
                torch.save = _half_then_full(torch.save)  # type: ignore[assignment]
            original(checkpoint, path, storage_options)

        io_plugin.save_checkpoint = save_checkpoint  # type: ignore[method-assign]

    def on_fit_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self.during == "export":
            import bilae.autoencoders.checkpoint as files

            real = files.save_file

            def full(tensors: Any, filename: str, metadata: Any = None) -> None:
                Path(filename).write_bytes(b"\0" * 1024)  # some bytes reached the disk
                raise OSError(errno.ENOSPC, "No space left on device", filename)

            files.save_file = full  # type: ignore[assignment]
            del real


def _half_then_full(real_save: Any) -> Any:
    def half(obj: Any, handle: Any, *args: Any, **kwargs: Any) -> None:
        buffer = io.BytesIO()
        real_save(obj, buffer)
        handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        torch.save = real_save  # the next write works again
        raise OSError(errno.ENOSPC, "No space left on device", getattr(handle, "name", None))

    return half
