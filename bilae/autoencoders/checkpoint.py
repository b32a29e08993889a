"""Checkpoint files: ``config.json`` + ``model.safetensors``, written atomically, read with clear errors."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from bilae.errors import CheckpointError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

REFERENCE_V1_TENSORS = {
    "left.weight": "left",
    "left.bias": "left_bias",
    "right.weight": "right",
    "right.bias": "right_bias",
}
"""The reference's v1 autoencoders hold ``left``/``right`` as ``nn.Linear`` layers, latents
(l·x̂ + a)(r·x̂ + c): their tensors map onto the affine variant's parameters."""


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``.

    A crash at any moment leaves either the old file or the new one, never a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp (and some writers) make 0600 files; give the usual permissions.
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(handle)`` on a temporary binary file and move it into place atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        write(handle)


def write_checkpoint(directory: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created if needed)."""
    directory = Path(directory)
    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    atomic_write_text(directory / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return directory


def read_config(directory: str | Path) -> dict[str, Any]:
    """Read ``config.json`` from a checkpoint directory, or say exactly what is missing or broken."""
    path = _existing(directory, CONFIG_FILE)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"checkpoint config {path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint config {path} must hold a JSON object, got {type(data).__name__}")
    return data


def read_weights(directory: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read ``model.safetensors`` (safetensors only: loading weights never runs code)."""
    path = _existing(directory, WEIGHTS_FILE)
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint weights {path} are corrupt or truncated ({err})") from None


def is_reference_v1(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether ``tensors`` use the reference's v1 layout (``left.weight``, ``left.bias``, ...)."""
    return any(name in tensors for name in REFERENCE_V1_TENSORS)


def from_reference_v1(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename v1 tensors to the affine variant's parameters (``left.bias`` → ``left_bias``); others stay."""
    return {REFERENCE_V1_TENSORS.get(name, name): tensor for name, tensor in tensors.items()}


def _existing(directory: str | Path, filename: str) -> Path:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(
            f"checkpoint directory {directory} does not exist; expected a folder with {CONFIG_FILE} and {WEIGHTS_FILE}"
        )
    path = directory / filename
    if not path.is_file():
        present = sorted(p.name for p in directory.iterdir())
        raise CheckpointError(f"checkpoint file {path} is missing (the folder holds: {present or 'nothing'})")
    return path
