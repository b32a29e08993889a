"""Crafted bad inputs and test-only hooks for tests/test_reliability.py, and an in-process CLI driver.

``python -m tests.support.crafted CASES.json`` runs ``bilae.train.main()`` once per case (``{"name", "argv"}``) in one
process, so a table of bad inputs pays for the imports once. Each case is the real console-script path (Hydra,
bilae's error reporting, ``sys.exit``); the driver catches the ``SystemExit`` (except the last case's, which ends the
process for real) and brackets each case's output::

    @@case <name>            (on stdout and stderr)
    @@exit <name> <code>     (on stdout and stderr)
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch


class Evil:
    """Unpickling this runs a shell command: what a malicious checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def evil_checkpoint(path: Path, marker: Path) -> Path:
    """A .ckpt that looks like Lightning's but runs ``touch marker`` when unpickled without weights_only."""
    torch.save({"state_dict": {}, "global_step": 0, "epoch": 0, "payload": Evil(marker)}, path)
    return path


def garbage_file(path: Path, size: int = 4096) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    return path


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


class PoisonActivations(L.Callback):
    """From optimiser step ``step`` on, every harvested activation is NaN (a broken layer or an fp16 overflow)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step < self.step or getattr(pl_module, "_poisoned", False):
            return
        harvest = pl_module.activations

        def poisoned(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            acts, mask = harvest(batch)
            return torch.full_like(acts, float("nan")), mask

        pl_module.activations = poisoned
        pl_module._poisoned = True


class SlowCheckpointWrites(L.Callback):
    """Makes every checkpoint write slow and visible, on Lightning's own write path.

    While a checkpoint is being written, ``<dirpath>/.writing-<name>`` exists (and ``writes.log`` lists the steps
    written), so a test can SIGKILL the run in the
    middle of a write. The bytes still go through the trainer's ``CheckpointIO`` (``_atomic_save``: fsspec's
    transaction, a temporary file then a move); only the file writes underneath are split into chunks with pauses.
    """

    def __init__(self, dirpath: str, pause: float = 0.05, chunks: int = 8) -> None:
        self.dirpath, self.pause, self.chunks = Path(dirpath), pause, chunks

    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        from fsspec.implementations.local import LocalFileOpener

        io = trainer.strategy.checkpoint_io
        original_save, original_write = io.save_checkpoint, LocalFileOpener.write
        pause, chunks, dirpath = self.pause, self.chunks, self.dirpath

        def slow_write(opener: Any, data: bytes, *args: Any, **kwargs: Any) -> int:
            step = max(1, len(data) // chunks)
            for start in range(0, len(data), step):
                time.sleep(pause)
                original_write(opener, data[start : start + step])
                opener.flush()
            return len(data)

        def save_checkpoint(checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
            marker = dirpath / f".writing-{Path(path).name}"
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
            LocalFileOpener.write = slow_write  # type: ignore[method-assign]
            try:
                original_save(checkpoint, path, storage_options)
            finally:
                LocalFileOpener.write = original_write  # type: ignore[method-assign]
                marker.unlink(missing_ok=True)
            with open(dirpath / "writes.log", "a") as log:  # the steps written so far, for the test to follow
                log.write(f"{checkpoint['global_step']}\n")

        io.save_checkpoint = save_checkpoint  # type: ignore[method-assign]


# ------------------------------------------------------------------------------------------------ driver
def run_cases(cases: list[dict[str, Any]]) -> None:
    """Run each case's ``bilae-train`` command line in turn; the last one's exit ends the process for real."""
    from hydra.core.global_hydra import GlobalHydra

    from bilae import train

    for i, case in enumerate(cases):
        name = case["name"]
        for stream in (sys.stdout, sys.stderr):
            print(f"@@case {name}", file=stream, flush=True)
        sys.argv = ["bilae-train", *case["argv"]]
        code: object = 0
        try:
            train.main()
        except SystemExit as done:
            code = done.code
            if i == len(cases) - 1:
                _report_exit(name, code)
                raise
        GlobalHydra.instance().clear()
        _report_exit(name, code)


def _report_exit(name: str, code: object) -> None:
    code = 0 if code is None else code if isinstance(code, int) else 1
    for stream in (sys.stdout, sys.stderr):
        print(f"@@exit {name} {code}", file=stream, flush=True)


def split_cases(text: str) -> dict[str, tuple[int, str]]:
    """``{name: (exit code, output)}`` from a driver's stdout or stderr."""
    results: dict[str, tuple[int, str]] = {}
    name, lines = None, []
    for line in text.splitlines():
        if line.startswith("@@case "):
            name, lines = line.split(" ", 1)[1], []
        elif line.startswith("@@exit ") and name is not None:
            results[name] = (int(line.rsplit(" ", 1)[1]), "\n".join(lines))
            name = None
        elif name is not None:
            lines.append(line)
    return results


if __name__ == "__main__":
    run_cases(json.loads(Path(sys.argv[1]).read_text()))
