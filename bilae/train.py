"""``bilae-train``: the Hydra entry point that trains an autoencoder (see conf/train.yaml)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig

from bilae.autoencoders import Autoencoder
from bilae.autoencoders.checkpoint import atomic_write_text
from bilae.builders import build, resolve_ckpt_path
from bilae.cli import ensure_writable, reported
from bilae.config import CONF_DIR
from bilae.module import BilinearAutoencoderModule

log = logging.getLogger("bilae")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train, validate, export; returns the final metrics (also written to ``metrics.json``)."""
    out = Path(cfg.paths.output_dir)
    module, datamodule, trainer = build(cfg)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resolve_ckpt_path(cfg, out), weights_only=True)
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
    """Console script ``bilae-train``."""
    with reported("bilae-train"):
        _main()


if __name__ == "__main__":
    main()
