"""Tiny composed configs for the tests: the real Hydra configs with small overrides (tiny Qwen3, CPU, offline).

``TINY`` is the one list of training overrides; the functions compose a config like the command line would and
drop the ``hydra`` node, so ``bilae.builders`` and the entry points' ``run`` can take it. Fixtures wrapping them
live in ``tests/conftest.py``; module-scoped fixtures call these functions directly.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from omegaconf import DictConfig, open_dict

from bilae.config import compose

ROOT = Path(__file__).resolve().parents[2]

#: The one tiny training set-up: a 4-layer Qwen3 (d=64) at layer 2, a x2 mixed coder, no logger, no callbacks.
TINY = [
    "model=qwen3-tiny",
    "autoencoder.expansion=2",
    "autoencoder.bottleneck=1",
    "data.n_ctx=32",
    "data.batch_size=4",
    "data.val_sequences=8",
    "data.max_sequences=400",
    "logger=none",
    "callbacks=none",
    "trainer.enable_progress_bar=false",
    "buffer_tokens=1024",
]
#: The tiny data set-up of bilae-analyze and bilae-cache (the training group's data.* and model options).
TINY_DATA = ["model=qwen3-tiny", "data.n_ctx=32", "data.batch_size=4", "data.val_sequences=8"]
#: The tiny bilae-analyze set-up: a small sample, few latents and points.
TINY_ANALYZE = [
    *TINY_DATA,
    "data.max_sequences=40",
    "analysis.sample_sequences=8",
    "analysis.n_features=3",
    "analysis.options.manifold.points=100",
    "analysis.options.atlas.rows=16",
]
#: TINY without its data.* options, for runs that read an activation cache (data=cache).
TINY_FOR_CACHE = [o for o in TINY if not o.startswith("data.")]


def composed(config_name: str, overrides: list[str]) -> DictConfig:
    """``compose(config_name, overrides)`` without the ``hydra`` node."""
    cfg = compose(config_name, overrides)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def train_cfg(out: Path, *overrides: str) -> DictConfig:
    """The tiny ``bilae-train`` config writing into ``out``."""
    return composed("train", [*TINY, f"paths.output_dir={out}", *overrides])


def cached_train_cfg(out: Path, cache: Path, *overrides: str) -> DictConfig:
    """The tiny ``bilae-train`` config reading the activation cache ``cache``."""
    return composed(
        "train", [*TINY_FOR_CACHE, "data=cache", f"data.dir={cache}", f"paths.output_dir={out}", *overrides]
    )


def analyze_cfg(out: Path, *overrides: str) -> DictConfig:
    """The tiny ``bilae-analyze`` config (no logger) writing into ``out``."""
    return composed("analyze", [*TINY_ANALYZE, "logger=none", f"paths.output_dir={out}", *overrides])


def cache_cfg(directory: Path, *overrides: str) -> DictConfig:
    """The tiny ``bilae-cache`` config writing the cache ``directory``."""
    tiny = [*TINY_DATA, "data.max_sequences=160", "cache.shard_tokens=1000"]
    return composed("cache", [*tiny, f"cache.dir={directory}", f"paths.output_dir={directory}", *overrides])


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess: offline, this checkout importable, no debug tracebacks."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", **extra}
    for name in ("BILAE_DEBUG", "HYDRA_FULL_ERROR"):
        env.pop(name, None)
    return env


def cli(module: str, *args: str) -> list[str]:
    """The command line of ``python -m <module> args`` (the console scripts' own code path)."""
    return [sys.executable, "-m", module, *args]
