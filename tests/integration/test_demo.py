"""The default `bilae-train` (the offline demo) and a Hydra multirun sweep, run as a user would run them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from bilae import Autoencoder
from bilae.builders import build_datamodule, build_harvester
from bilae.config import compose
from tests.support.configs import TINY, cli, cli_env
from tests.support.wandb_records import history

#: What a default run printed before issue 10 (none of it may come back).
NOISE = (
    "was called without a model",
    'ckpt_path="last") is set, but there is no last checkpoint',
    "Using ModelCheckpoint with manual optimization",
    "LeafSpec",
    "litlogger",
    "anonymous setting",
    "Epoch ",
)


def bilae_train(*args: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli("bilae.train", *args), cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=timeout
    )


def recompute_val_mse(folder: Path) -> float:
    """val/mse of an exported autoencoder on the demo's validation split, token-weighted like Lightning."""
    cfg = compose("train", ["paths.output_dir=/unused"])
    harvester = build_harvester(cfg.model)
    datamodule = build_datamodule(cfg, harvester.tokenizer)
    datamodule.setup("validate")
    coder = Autoencoder.load(folder)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in datamodule.val_dataloader():
            acts, mask = harvester(batch["input_ids"], batch["attention_mask"])  # the same harvest, by hand
            n = int(mask.sum())
            total += float(coder.loss(acts, mask)[1]["mse"]) * n
            count += n
    return total / count


@pytest.mark.slow
def test_default_demo_runs_offline(tmp_path: Path) -> None:
    """The default `bilae-train` (its wall time is a `scripts/bench.py` figure, never asserted here)."""
    run = tmp_path / "run"
    done = bilae_train(f"hydra.run.dir={run}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    # A quiet console: none of the libraries' noise, and Lightning's Rich bar counts optimiser steps.
    for noise in NOISE:
        assert noise not in done.stderr, f"{noise!r} on stderr:\n{done.stderr[-3000:]}"
    assert "step 150/150" in done.stdout, done.stdout[-2000:]

    # It says where everything is.
    assert "checkpoint:" in done.stdout and "W&B run:" in done.stdout and "autoencoder:" in done.stdout

    # The W&B offline run holds the logged scalars of every step.
    (wandb_dir,) = (run / "wandb").glob("offline-run-*")
    steps = history(wandb_dir)
    keys = {key for step in steps for key in step}
    assert {"train/loss", "train/mse", "train/density", "lr", "train/grad_norm", "val/mse"} <= keys
    logged_val = [float(step["val/mse"]) for step in steps if "val/mse" in step]

    # The exported checkpoint gives the logged val/mse again.
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val/mse"] == pytest.approx(logged_val[-1], rel=1e-6)
    (folder,) = (run / "autoencoder").iterdir()
    assert recompute_val_mse(folder) == pytest.approx(metrics["val/mse"], rel=1e-4)


@pytest.mark.slow
def test_multirun_sweep_leaves_metrics_per_run(tmp_path: Path) -> None:
    done = bilae_train(
        "-m", *TINY, "steps=4", "trainer.val_check_interval=4", "autoencoder.alpha=0,0.2",
        f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    runs = sorted((tmp_path / "sweep").glob("*/metrics.json"))
    assert len(runs) == 2
    for path in runs:
        metrics = json.loads(path.read_text())
        assert {"train/mse", "val/mse", "train/density", "val/density"} <= set(metrics)
    names = sorted(p.name for p in (tmp_path / "sweep").glob("*/autoencoder/*"))
    assert names == ["mixed-l02-x2-a0-b0", "mixed-l02-x2-a20-b0"]
