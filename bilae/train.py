"""``bilae-train``: the Hydra entry point that trains an autoencoder (see conf/train.yaml)."""

from __future__ import annotations

import itertools
import json
import logging
import zlib
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from bilae.autoencoders import Autoencoder, AutoencoderConfig
from bilae.autoencoders.checkpoint import atomic_write, atomic_write_text
from bilae.config import CONF_DIR
from bilae.errors import BilaeError, CheckpointError, UsageError
from bilae.hooks import Harvester
from bilae.lm import load_lm
from bilae.module import BilinearAutoencoderModule
from bilae.optim import OptimizerConfig

log = logging.getLogger("bilae")


def build_harvester(model_cfg: DictConfig) -> Harvester:
    """Load the frozen LM named by the ``model`` config group and hook it at ``model.layer``."""
    overrides = OmegaConf.to_container(model_cfg.overrides, resolve=True)
    model, tokenizer = load_lm(
        model_cfg.name,
        dtype=model_cfg.dtype,
        revision=model_cfg.revision,
        trust_remote_code=model_cfg.trust_remote_code,
        **overrides,  # type: ignore[arg-type]
    )
    return Harvester(
        model,
        tokenizer,
        model_cfg.layer,
        exclude_special=model_cfg.exclude_special,
        sink_factor=model_cfg.sink_factor,
        layers_path=model_cfg.layers_path,
    )


def build_coders(cfg: DictConfig, d_model: int) -> list[Autoencoder]:
    """Fresh autoencoders sized for the hooked model: one, or one per combination of list-valued options.

    ``autoencoder.alpha=[0,0.1,0.2]`` (or ``autoencoder.kind=[mixed,vanilla]``) trains every combination on the
    same activation batches in one process, so the LM runs once per batch for all of them.
    """
    options: dict[str, Any] = OmegaConf.to_container(cfg.autoencoder, resolve=True)  # type: ignore[assignment]
    swept = {k: v for k, v in options.items() if isinstance(v, list) and k != "tags"}
    combos = [dict(zip(swept, values)) for values in itertools.product(*swept.values())] or [{}]
    return [_coder({**options, **combo}, d_model, cfg.model.layer, cfg.seed) for combo in combos]


def build_coder(cfg: DictConfig, d_model: int) -> Autoencoder:
    """The single autoencoder of a config without list-valued options."""
    (coder,) = build_coders(cfg, d_model)
    return coder


def _coder(options: dict[str, Any], d_model: int, layer: int, seed: int) -> Autoencoder:
    # Each coder's initialisation depends on the seed and its own name only, not on what trains beside it.
    options = dict(options)
    kind = options.pop("kind")
    name = AutoencoderConfig(kind=kind, d_model=d_model, layer=layer, **options).name
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        return Autoencoder.from_config(kind, d_model=d_model, layer=layer, **options)


def load_coder(path: str, harvester: Harvester) -> Autoencoder:
    """An exported autoencoder to continue from; it must have been trained on this model and layer."""
    coder = Autoencoder.load(path)
    check_coder_fits(coder, harvester, source=str(path))
    return coder


def check_coder_fits(coder: Autoencoder, harvester: Harvester, *, source: str) -> None:
    """Refuse an autoencoder whose d_model or layer differs from the hooked model's."""
    name = getattr(harvester.model, "name_or_path", "") or type(harvester.model).__name__
    if coder.config.d_model != harvester.d_model:
        raise CheckpointError(
            f"autoencoder {source} has d_model {coder.config.d_model}, but model {name!r} has d_model "
            f"{harvester.d_model}; use a checkpoint trained on this model"
        )
    if coder.config.layer != harvester.layer:
        raise CheckpointError(
            f"autoencoder {source} was trained at layer {coder.config.layer}, but the model is hooked at layer "
            f"{harvester.layer}; set model.layer={coder.config.layer} or use a checkpoint for layer {harvester.layer}"
        )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written beside their target, fsynced and renamed into place: never half-written.

    (Lightning stages checkpoints in $TMPDIR; on another filesystem its final move is an in-place copy.)
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        atomic_write(path, lambda handle: torch.save(checkpoint, handle))


def build(cfg: DictConfig) -> tuple[BilinearAutoencoderModule, L.LightningDataModule, L.Trainer]:
    """Everything a run needs, instantiated from the composed config (seeded, so builds are reproducible)."""
    L.seed_everything(cfg.seed, workers=True)
    if cfg.data.get("source") == "cache":  # activations harvested by bilae-cache: the LM is never loaded
        from bilae.cache import coders_for_cache

        harvester, tokenizer, coders = None, None, coders_for_cache(cfg)
    else:
        harvester = build_harvester(cfg.model)
        tokenizer = harvester.tokenizer
        coders = (
            [load_coder(cfg.init_from, harvester)]
            if cfg.get("init_from")
            else build_coders(cfg, harvester.d_model)
        )
    datamodule = build_datamodule(cfg, tokenizer)
    module = BilinearAutoencoderModule(
        coders,
        harvester,
        optimizer=OptimizerConfig(**cfg.optimizer),
        max_steps=cfg.steps,
        alpha_warmup=cfg.alpha_warmup,
        grad_clip=cfg.grad_clip,
        buffer=build_buffer(cfg),
    )
    loggers = [instantiate_clean(c) for c in (cfg.logger or {}).values()]
    callbacks = [instantiate_clean(c) for c in (cfg.callbacks or {}).values()]
    trainer = instantiate_clean(
        cfg.trainer, logger=loggers or False, callbacks=callbacks, plugins=[AtomicCheckpointIO()]
    )
    return module, datamodule, trainer


def build_datamodule(cfg: DictConfig, tokenizer: Any) -> L.LightningDataModule:
    return instantiate_clean(cfg.data, tokenizer=tokenizer, seed=cfg.seed, _convert_="all")


def instantiate_clean(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that lets bilae's own errors through unwrapped (one clear message)."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, BilaeError):
            raise err.__cause__ from None
        raise


def build_buffer(cfg: DictConfig) -> Any:
    from bilae.data import ShuffleBuffer

    if not cfg.buffer_tokens:
        return None
    return ShuffleBuffer(capacity=cfg.buffer_tokens, seed=cfg.seed)


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


def resolve_ckpt_path(cfg: DictConfig, out: Path) -> str | None:
    """``ckpt_path=last`` means this run directory's last checkpoint; any other value must exist."""
    if cfg.ckpt_path is None:
        return None
    path = out / "checkpoints" / "last.ckpt" if cfg.ckpt_path == "last" else Path(cfg.ckpt_path)
    if not path.is_file():
        raise UsageError(
            f"ckpt_path {str(path)!r} does not exist; give a Lightning .ckpt file written by bilae-train"
        )
    from bilae.cli import safe_checkpoint

    return safe_checkpoint(path)  # refuses pickled code before Lightning unpickles anything


METRIC_KEYS = ("train/mse", "train/density", "train/loss", "val/mse", "val/density")


def summarize(
    module: BilinearAutoencoderModule, trained: dict[str, Any], final: dict[str, Any], steps: int
) -> dict[str, Any]:
    """The numbers a sweep compares: last training step's metrics and the final validation, per autoencoder.

    One autoencoder: a flat dict (plus its name, kind, α). Several: the same per name under ``coders``.
    """
    logged = {k: float(v) for k, v in {**trained, **final}.items()}
    per_coder = {}
    for i, coder in enumerate(module.autoencoders):
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
    for i, coder in enumerate(module.autoencoders):
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
    from bilae.cli import ensure_writable, reported

    with reported("bilae-train", where=cfg.paths.output_dir):
        ensure_writable(cfg.paths.output_dir)
        metrics = run(cfg)
    return metrics.get("val/mse")


def main() -> None:
    """Console script ``bilae-train``."""
    from bilae.cli import reported

    with reported("bilae-train"):
        _main()


if __name__ == "__main__":
    main()
