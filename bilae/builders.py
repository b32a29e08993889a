"""Config → objects: every function that turns a composed Hydra config into the objects a command needs.

``bilae-train``, ``bilae-analyze`` and ``bilae-cache`` import from here and never from each other. Builders are
seeded where it matters (coders are initialised from the seed and their own name only), and bilae's own errors
leave ``hydra.utils.instantiate`` unwrapped, so a bad value is one clear line.
"""

from __future__ import annotations

import itertools
import zlib
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from bilae.autoencoders import Autoencoder, AutoencoderConfig
from bilae.autoencoders.streaming_loss import available_ram
from bilae.cache_reader import META_FILE, read_meta
from bilae.checkpoint_io import AtomicCheckpointIO
from bilae.cli import safe_checkpoint
from bilae.console import StepProgressBar
from bilae.errors import BilaeError, CheckpointError, UsageError
from bilae.hooks import Harvester
from bilae.lm import load_lm
from bilae.module import BilinearAutoencoderModule
from bilae.optim import OptimizerConfig
from bilae.resume import AdoptResumeRecord, is_resume_attempt
from bilae.source import ActivationSource, ShuffleBuffer, SourcedDataModule
from bilae.tracking import is_wandb, wandb_arguments
from bilae.validation import check_train


def instantiate_clean(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that lets bilae's own errors through unwrapped (one clear message)."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, BilaeError):
            raise err.__cause__ from None
        raise


def reads_cache(cfg: DictConfig) -> bool:
    """Whether the run trains from activations cached by ``bilae-cache`` (then the LM is never loaded)."""
    return cfg.data.get("source") == "cache"


def makes_activations(cfg: DictConfig) -> bool:
    """Whether the data source makes its own activations of width ``data.d_model`` (``data=planted``, synthetic
    activations): then no LM is loaded either."""
    return cfg.data.get("source") == "planted"


# ----------------------------------------------------------------------------------------------- the LM
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


# ----------------------------------------------------------------------------------------------- coders
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
    config = AutoencoderConfig(kind=kind, d_model=d_model, layer=layer, **options)
    check_fits_in_memory(config)
    name = config.name
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        return Autoencoder.from_config(kind, d_model=d_model, layer=layer, **options)


def check_fits_in_memory(config: AutoencoderConfig, copies: int = 4) -> None:
    """Refuse a coder whose weights and training state (weights, gradients, momentum, scratch: ``copies`` float32
    copies) cannot be allocated in the RAM available, saying how much it needs."""
    m, d, b = config.d_features, config.d_model, config.d_bottleneck
    need = copies * 4 * (2 * m * d + b * m)
    have = available_ram()
    if need > have:
        raise UsageError(
            f"autoencoder.expansion={config.expansion} at d_model {d} means {m:,} latents: its weights and "
            f"training state need about {need / 2**30:.1f} GiB, but {have / 2**30:.1f} GiB of memory is available; "
            "lower autoencoder.expansion (or autoencoder.bottleneck)"
        )


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


def coders_for_cache(cfg: DictConfig) -> list[Autoencoder]:
    """The autoencoders of a run that trains from ``cfg.data.dir``, checked against the cache's model and layer."""
    meta = read_meta(cfg.data.dir)
    where = Path(cfg.data.dir) / META_FILE
    if (cfg.model.name, cfg.model.layer) != (meta["model"], meta["layer"]):
        raise UsageError(
            f"the cache {where} was harvested from model {meta['model']!r} at layer {meta['layer']}, but the config "
            f"asks for model {cfg.model.name!r} at layer {cfg.model.layer}; set model.name={meta['model']} "
            f"model.layer={meta['layer']} (or the matching model=... option)"
        )
    if not cfg.get("init_from"):
        return build_coders(cfg, meta["d_model"])
    coder = Autoencoder.load(cfg.init_from)
    if (coder.config.d_model, coder.config.layer) != (meta["d_model"], meta["layer"]):
        raise CheckpointError(
            f"autoencoder {cfg.init_from} has d_model {coder.config.d_model} and layer {coder.config.layer}, but "
            f"the cache {where} holds d_model {meta['d_model']} at layer {meta['layer']}"
        )
    return [coder]


# ------------------------------------------------------------------------------------------------- data
def build_buffer(cfg: DictConfig) -> ShuffleBuffer | None:
    """The shuffling buffer of ``buffer_tokens`` tokens (``None`` when 0)."""
    if not cfg.buffer_tokens:
        return None
    return ShuffleBuffer(capacity=cfg.buffer_tokens, seed=cfg.seed)


def build_datamodule(
    cfg: DictConfig, tokenizer: Any, activations: ActivationSource | None = None
) -> SourcedDataModule:
    """The ``data`` group's data module; ``activations`` turns its batches into activations on the device."""
    factory = instantiate_clean(cfg.data, _partial_=True, _convert_="all")
    return factory(tokenizer=tokenizer, seed=cfg.seed, activations=activations)


def build_training_data(cfg: DictConfig) -> tuple[list[Autoencoder], SourcedDataModule]:
    """The coders to train and the data module feeding them (harvesting live, or reading a cache)."""
    if reads_cache(cfg):  # activations harvested by bilae-cache: the LM is never loaded
        harvester, coders = None, coders_for_cache(cfg)
    elif makes_activations(cfg):
        harvester, coders = None, build_coders(cfg, int(cfg.data.d_model))
    else:
        harvester = build_harvester(cfg.model)
        init_from = cfg.get("init_from")
        coders = [load_coder(init_from, harvester)] if init_from else build_coders(cfg, harvester.d_model)
    activations = ActivationSource(harvester, build_buffer(cfg))
    tokenizer = None if harvester is None else harvester.tokenizer
    return coders, build_datamodule(cfg, tokenizer, activations)


# ----------------------------------------------------------------------------------------------- Lightning
def build_loggers(cfg: DictConfig) -> list[Any]:
    """The configured Lightning loggers (none with ``logger=none``); a W&B logger gets this job's own run."""
    loggers = []
    for node in (cfg.get("logger") or {}).values():
        extra = wandb_arguments(cfg, node) if is_wandb(node) else {}
        # Partial first: wandb's `config` argument would collide with instantiate's own.
        loggers.append(instantiate_clean(node, _partial_=True)(**extra))
    return loggers


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """The ``callbacks`` group's callbacks, the bar that counts optimiser steps (with the progress bar on) and, for a
    resume from a run's checkpoint alone, the callback that makes its record the run's once it trains.

    ``trainer.enable_checkpointing=false`` drops the checkpoint callbacks (Lightning refuses them then).
    """
    callbacks = [instantiate_clean(c) for c in (cfg.callbacks or {}).values()]
    if not cfg.trainer.get("enable_checkpointing", True):
        callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(StepProgressBar())
    if cfg.get("ckpt_path") and is_resume_attempt():  # `ckpt_path=<run>/...` alone (bilae.resume)
        callbacks.append(AdoptResumeRecord(cfg.paths.output_dir))
    return callbacks


def build_trainer(cfg: DictConfig) -> L.Trainer:
    """The Lightning trainer with the configured loggers and callbacks; checkpoints are written atomically."""
    factory = instantiate_clean(cfg.trainer, _partial_=True)
    return factory(
        logger=build_loggers(cfg) or False, callbacks=build_callbacks(cfg), plugins=[AtomicCheckpointIO()]
    )


def build(cfg: DictConfig) -> tuple[BilinearAutoencoderModule, SourcedDataModule, L.Trainer]:
    """Everything a training run needs, instantiated from the composed config (seeded, so builds reproduce)."""
    check_train(cfg)  # every value that needs no model, before anything is loaded
    L.seed_everything(cfg.seed, workers=True)
    coders, datamodule = build_training_data(cfg)
    module = BilinearAutoencoderModule(
        coders,
        optimizer=OptimizerConfig(**cfg.optimizer),
        max_steps=cfg.steps,
        alpha_warmup=cfg.alpha_warmup,
        grad_clip=cfg.grad_clip,
    )
    return module, datamodule, build_trainer(cfg)


def resolve_ckpt_path(cfg: DictConfig, out: Path) -> str | None:
    """``ckpt_path=last`` means this run directory's last checkpoint; any other value must exist."""
    if cfg.ckpt_path is None:
        return None
    path = out / "checkpoints" / "last.ckpt" if cfg.ckpt_path == "last" else Path(cfg.ckpt_path)
    if not path.is_file():
        raise UsageError(
            f"ckpt_path {str(path)!r} does not exist; give a Lightning .ckpt file written by bilae-train"
        )
    return safe_checkpoint(path)  # refuses pickled code before Lightning unpickles anything
