"""``bilae-train``: the Hydra entry point that trains an autoencoder (see conf/train.yaml)."""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig

from bilae.analysis.sweep import flatten
from bilae.autoencoders import Autoencoder
from bilae.autoencoders.checkpoint import atomic_write_text
from bilae.builders import build, resolve_ckpt_path
from bilae.cli import ensure_writable, reported
from bilae.config import CONF_DIR
from bilae.console import quiet_console
from bilae.module import BilinearAutoencoderModule
from bilae.resume import resume_arguments
from bilae.tracking import finish_runs

log = logging.getLogger("bilae")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train, validate, export; returns the final metrics (also written to ``metrics.json``).

    The job's W&B run (if any) is finished at the end with these metrics as its summary, so the next job of a sweep
    starts its own run.
    """
    module, datamodule, trainer = build(cfg)
    try:
        metrics = train(cfg, module, datamodule, trainer)
    except BaseException:
        finish_runs(trainer.loggers, exit_code=1)
        raise
    finish_runs(trainer.loggers, flatten(metrics))
    return metrics


def train(
    cfg: DictConfig, module: BilinearAutoencoderModule, datamodule: Any, trainer: L.Trainer
) -> dict[str, Any]:
    """Fit (resuming from ``ckpt_path`` if set), validate once more, export and say where everything is."""
    out = Path(cfg.paths.output_dir)
    ckpt_path = resolve_ckpt_path(cfg, out)
    with warnings.catch_warnings():
        if ckpt_path is not None:  # a resume continues in its own checkpoint directory on purpose
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    trained: dict[str, Any] = {**trainer.callback_metrics}  # validate() below resets callback_metrics
    final: dict[str, Any] = {**trainer.validate(module, datamodule=datamodule, verbose=False)[0]}
    metrics = summarize(module, trained, final, trainer.global_step)
    if trainer.is_global_zero:
        if cfg.export:
            export(module, trainer, out, cfg)
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        report_locations(out, trainer)
    return metrics


METRIC_KEYS = ("train/mse", "train/density", "train/loss", "val/mse", "val/density")


def summarize(
    module: BilinearAutoencoderModule, trained: dict[str, Any], final: dict[str, Any], steps: int
) -> dict[str, Any]:
    """The numbers a sweep compares: last training step's metrics and the final validation, per autoencoder.

    One autoencoder: a flat dict (plus its name, kind, α). Several: the same per name under ``coders``.
    """
    logged = {k: float(v) for k, v in {**trained, **final}.items()}
    per_coder = {}
    for i, coder in enumerate(module.typed_coders()):
        p = module.prefix(i)
        values = {k: logged[p + k] for k in METRIC_KEYS if p + k in logged}
        c = coder.config
        per_coder[c.name] = {
            **values,
            "name": c.name,
            "kind": c.kind,
            "alpha": c.alpha,
            "expansion": c.expansion,
        }
    common = {"steps": float(steps), "tokens_seen": logged.get("train/tokens_seen", 0.0)}
    if len(per_coder) == 1:
        return {**next(iter(per_coder.values())), **common}
    return {"coders": per_coder, "val/mse": logged.get("val/mse"), **common}


def export(module: BilinearAutoencoderModule, trainer: L.Trainer, out: Path, cfg: DictConfig) -> list[Path]:
    """Write each final autoencoder (and the best by val/mse) in the hub layout ``<dir>/<name>/``."""
    monitored = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.monitor]
    best = monitored[0].best_model_path if monitored else ""
    state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"] if best else None
    folders = []
    for i, coder in enumerate(module.typed_coders()):
        name = coder.config.name
        folders.append(coder.save(out / "autoencoder" / name))
        if state is not None:
            prefix = f"coders.{i}."
            best_coder = Autoencoder.resolve(coder.kind)(coder.config)
            best_coder.load_state_dict(
                {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
            )
            best_coder.save(out / "autoencoder-best" / name)
        if cfg.log_artifact:
            log_artifact(trainer, folders[-1], name)
    return folders


def log_artifact(trainer: L.Trainer, folder: Path, name: str) -> None:
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            artifact = wandb.Artifact(name, type="autoencoder")
            artifact.add_dir(str(folder))
            logger.experiment.log_artifact(artifact)


def report_locations(out: Path, trainer: L.Trainer) -> None:
    """Print where the run left its checkpoint, autoencoders, W&B run and report."""
    from lightning.pytorch.loggers import WandbLogger

    lines = [f"run directory:  {out}"]
    checkpoint = trainer.checkpoint_callback
    if isinstance(checkpoint, ModelCheckpoint) and checkpoint.last_model_path:
        lines.append(f"checkpoint:     {checkpoint.last_model_path}")
    lines += [f"autoencoder:    {folder}" for folder in sorted(out.glob("autoencoder*/*"))]
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            lines.append(f"W&B run:        {logger.experiment.dir}  (offline: `wandb sync` uploads it)")
    lines += [f"report:         {report}" for report in sorted(out.glob("report*.html"))]
    print("\n".join(lines), flush=True)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def _main(cfg: DictConfig) -> float | None:
    with reported("bilae-train", where=cfg.paths.output_dir):
        ensure_writable(cfg.paths.output_dir)
        metrics = run(cfg)
    return metrics.get("val/mse")


def main() -> None:
    """Console script ``bilae-train``.

    ``ckpt_path=<run>/checkpoints/last.ckpt`` (or ``=<run>``) alone resumes that run: its overrides, its directory,
    its W&B run (see :mod:`bilae.resume`).
    """
    quiet_console()
    with reported("bilae-train"):
        sys.argv = [sys.argv[0], *resume_arguments(sys.argv[1:])]
        _main()


if __name__ == "__main__":
    main()
