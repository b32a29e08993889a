"""Range and type checks of a composed config, run once before anything is loaded or written.

Hydra accepts any value for any key (``steps=abc``, ``optimizer.lr=nan``, ``data.n_ctx=-3``); these checks turn
each into one clear :class:`~bilae.errors.UsageError` naming the key, the bad value and what would be valid. The
autoencoder's own hyper-parameters are checked by ``AutoencoderConfig``; the analysis settings by
``AnalysisSettings``; what needs the model (a layer out of range, n_ctx beyond its positions) by the builders.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from bilae.errors import UsageError


@dataclass(frozen=True)
class Check:
    """``key`` must be an integer (``integer``) or a finite number, at least ``low`` (or above it when ``open``),
    below ``high`` if given; ``None`` only when ``optional``."""

    key: str
    integer: bool = True
    low: float = 0
    open: bool = False
    high: float | None = None
    optional: bool = False

    def valid(self) -> str:
        what = "an integer" if self.integer else "a finite number"
        bound = f"{'>' if self.open else '>='} {self.low:g}"
        upper = f" and < {self.high:g}" if self.high is not None else ""
        return f"{what} {bound}{upper}" + (" or null" if self.optional else "")

    def check(self, value: Any) -> None:
        if value is None and self.optional:
            return
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = number and (not self.integer or isinstance(value, int) or float(value).is_integer())
        ok = ok and math.isfinite(value) and (value > self.low if self.open else value >= self.low)
        ok = ok and (self.high is None or value < self.high)
        if not ok:
            raise UsageError(f"{self.key} must be {self.valid()}, got {value!r}")


RUN = [
    Check("seed"),
    Check("steps", low=1),
    Check("alpha_warmup"),
    Check("grad_clip", integer=False),
    Check("buffer_tokens"),
]
OPTIMIZER = [
    Check("optimizer.lr", integer=False, open=True),
    Check("optimizer.adam_lr", integer=False, open=True),
    Check("optimizer.weight_decay", integer=False),
    Check("optimizer.momentum", integer=False, high=1),
    Check("optimizer.warmup_steps"),
]
DATA = [
    Check("data.n_ctx", low=1),
    Check("data.batch_size", low=1),
    Check("data.max_sequences", low=1, optional=True),
    Check("data.stream_batches", low=1),
    Check("data.batch_tokens", low=1),
    Check("data.val_batch_tokens", low=1, optional=True),
    Check("data.window_shards", low=1),
]
MODEL = [
    Check("model.layer", optional=True),
    Check("model.sink_factor", integer=False, open=True, optional=True),
]
TRAINER = [Check("trainer.devices", low=1)]


def check_train(cfg: DictConfig) -> None:
    """Every setting of a ``bilae-train`` config that needs no model to check."""
    run_checks(cfg, [*RUN, *OPTIMIZER, *DATA, *MODEL, *TRAINER])
    check_val_sequences(cfg)
    check_accelerator(cfg.trainer.get("accelerator"), "trainer.accelerator", "trainer=cpu")


def check_analyze(cfg: DictConfig) -> None:
    """Every setting of a ``bilae-analyze`` config that needs no model to check."""
    run_checks(cfg, [Check("seed"), Check("feature", optional=True), *DATA, *MODEL])
    check_val_sequences(cfg)
    device = str(cfg.device)
    if device not in ("auto", "cpu") and not device.startswith(("cuda", "mps")):
        raise UsageError(f"device must be auto, cpu or cuda[:N], got {device!r}")
    check_accelerator(device, "device", "device=cpu")
    check_output_file(cfg.get("report"), "report")
    from bilae.analysis.registry import AnalysisSettings, selected

    selected(AnalysisSettings.from_config(cfg.analysis))  # ranges, unknown analyses and options


def check_cache(cfg: DictConfig) -> None:
    """Every setting of a ``bilae-cache`` config that needs no model to check (``cache.*`` in the writer)."""
    run_checks(cfg, [Check("seed"), *DATA, *MODEL])
    check_val_sequences(cfg)
    check_accelerator(str(cfg.cache.device), "cache.device", "cache.device=cpu")


def check_output_file(path: Any, key: str) -> None:
    """A file to write must not be a directory nor sit below a regular file."""
    if path is None:
        return
    target = Path(str(path)).expanduser()
    if target.is_dir():
        raise UsageError(f"{key}={target} is a directory; give a file path such as {target / 'report.html'}")
    blocking = next((p for p in target.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise UsageError(f"{key}={target} cannot be written: {blocking} is a file, not a directory")


def run_checks(cfg: DictConfig, checks: Iterable[Check]) -> None:
    for check in checks:
        if OmegaConf.select(cfg, check.key, default="<absent>") != "<absent>":
            check.check(OmegaConf.select(cfg, check.key))


def check_val_sequences(cfg: DictConfig) -> None:
    """``data.val_sequences``: a count (integer >= 0) or a fraction in [0, 1)."""
    value = OmegaConf.select(cfg, "data.val_sequences", default=None)
    if value is None:
        return
    if isinstance(value, float) and not value.is_integer():
        Check("data.val_sequences", integer=False, high=1).check(value)
    else:
        Check("data.val_sequences").check(value)


def check_accelerator(accelerator: Any, key: str, instead: str) -> None:
    """A CUDA accelerator asked for on a machine without one is refused before anything starts."""
    import torch

    name = str(accelerator or "").lower()
    if name in ("gpu", "cuda") or name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(
                f"{key}={accelerator} asks for a CUDA GPU, but none is available here; use {instead}"
            )
