"""``bilae-analyze``: analyse a trained autoencoder, log its figures to W&B and write the HTML report.

    bilae-analyze checkpoint=outputs/<date>/<time>
    bilae-analyze checkpoint=tdooms/qwen3-0.6b-base-scope name=mixed-l18-x16-a100-b0 model=qwen3-0.6b-base

Loads the checkpoint and the LM (hooked at the checkpoint's layer unless ``model.layer`` says otherwise), checks
that they fit, harvests a small validation sample and runs the same analyses as the training callbacks
(see conf/analyze.yaml).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig

from bilae.analysis.overlap import check_indices
from bilae.analysis.registry import AnalysisSettings, run_analyses, selected
from bilae.analysis.session import AnalysisSession, predictions_note, validation_sample
from bilae.autoencoders import Autoencoder
from bilae.autoencoders.checkpoint import CONFIG_FILE
from bilae.builders import build_datamodule, build_harvester, build_loggers, check_coder_fits
from bilae.callbacks import log_panels, log_results
from bilae.cli import reported
from bilae.config import CONF_DIR
from bilae.errors import CheckpointError, UsageError
from bilae.report import build_report, write_report
from bilae.source import ActivationSource
from bilae.validation import check_analyze

log = logging.getLogger("bilae")


def load_checkpoint(cfg: DictConfig) -> tuple[Autoencoder, str]:
    """The autoencoder named by ``checkpoint`` (and ``name``), and a description of where it came from."""
    if not cfg.checkpoint:
        raise UsageError(
            "give checkpoint=<folder with config.json and model.safetensors> (or a bilae-train run directory), "
            "or checkpoint=<hub repo or local dir> name=<autoencoder name>"
        )
    if cfg.name:
        source = f"{cfg.checkpoint}/{cfg.name}"
        return Autoencoder.from_pretrained(cfg.checkpoint, cfg.name, revision=cfg.revision), source
    folder = Path(cfg.checkpoint).expanduser()
    if folder.is_dir() and not (folder / CONFIG_FILE).is_file():
        folder = exported_folder(folder)
    return Autoencoder.load(folder), str(folder)


def load_other(cfg: DictConfig, coder: Autoencoder) -> Autoencoder | None:
    """The autoencoder named by ``compare`` (a checkpoint folder or a bilae-train run directory), checked to read
    the same activations as ``coder``; ``None`` without ``compare``."""
    if not cfg.get("compare"):
        return None
    folder = Path(str(cfg.compare)).expanduser()
    if not folder.is_dir():
        raise UsageError(
            f"compare={cfg.compare} is not a folder; give an autoencoder folder (config.json + model.safetensors) "
            "or a bilae-train run directory"
        )
    other = Autoencoder.load(folder if (folder / CONFIG_FILE).is_file() else exported_folder(folder))
    if other.config.d_model != coder.config.d_model:
        raise CheckpointError(
            f"compare={cfg.compare} has d_model {other.config.d_model}, but checkpoint {coder.config.name} has "
            f"d_model {coder.config.d_model}; compare autoencoders of the same model"
        )
    return other


def exported_folder(run_dir: Path) -> Path:
    """The one autoencoder a bilae-train run directory exported (``<run>/autoencoder/<name>``)."""
    found = sorted(p.parent for p in run_dir.glob(f"autoencoder/*/{CONFIG_FILE}"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise CheckpointError(
            f"{run_dir} holds no {CONFIG_FILE}: give an autoencoder folder (config.json + model.safetensors) "
            "or a bilae-train run directory"
        )
    names = [p.name for p in found]
    raise CheckpointError(
        f"{run_dir} exported several autoencoders; pick one: checkpoint={run_dir}/autoencoder/<name> with <name> in {names}"
    )


def analysis_settings(cfg: DictConfig, m: int) -> AnalysisSettings:
    """The ``analysis`` settings with ``feature`` folded in and every index checked against the m latents."""
    settings = AnalysisSettings.from_config(cfg.analysis)
    picked = ([] if cfg.feature is None else [cfg.feature]) + list(settings.features or [])
    settings.features = [int(i) for i in check_indices(picked, m)] if picked else None
    selected(settings)  # unknown analyses and options fail before anything is loaded
    return settings


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} asked for, but no CUDA device is available; use device=cpu")
    return torch.device(device)


def run(cfg: DictConfig) -> Path:
    """Analyse the checkpoint, log to the configured loggers and write the report; returns the report's path."""
    check_analyze(cfg)
    L.seed_everything(cfg.seed, verbose=False)
    coder, source = load_checkpoint(cfg)
    log.info(
        "analyse: loaded %s (%s, %d latents) from %s", coder.config.name, coder.kind, coder.d_features, source
    )
    settings = analysis_settings(cfg, coder.d_features)
    other = load_other(cfg, coder)
    if settings.run is not None:  # asked for by name: refuse what cannot run before loading the LM
        for analysis in selected(settings):
            if analysis.needs_bottleneck and getattr(coder, "down", None) is None:
                raise UsageError(
                    f"analysis {analysis.name!r} needs a bottleneck D, but a {coder.kind!r} autoencoder has none; "
                    "kinds with a bottleneck: 'mixed' or 'combined'"
                )
    if cfg.model.layer is None:
        cfg.model.layer = coder.config.layer
    harvester = build_harvester(cfg.model)
    check_coder_fits(coder, harvester, source=source)
    device = resolve_device(cfg.device)
    harvester.to(device)
    batches = sample(cfg, harvester, settings, device)
    session = AnalysisSession(coder.to(device), batches, harvester.tokenizer, other=other)
    latents = session.choose(settings.features, settings.n_features, settings.skip_densest)
    log.info("analyse: %d sampled tokens; latents shown: %s", session.n_tokens, latents)
    loggers = build_loggers(cfg)
    results = run_analyses(session, latents, settings, strict=True)
    log_results(loggers, results, step=0)
    for result in results:
        log.info("analyse: %s %s", result.analysis.name, result.skipped or f"took {result.seconds:.2f} s")
    start = time.perf_counter()
    summary = {
        "checkpoint": source,
        "model": f"{cfg.model.name} (layer {cfg.model.layer})",
        "next-token predictions": predictions_note(batches, harvester),
    }
    report = build_report(
        session, latents, results, title=f"bilae report: {coder.config.name}", summary=summary
    )
    path = write_report(cfg.report, report)
    log_panels(loggers, {}, {"analysis/time/report": time.perf_counter() - start}, step=0)
    finish(loggers, path)
    return path


def sample(cfg: DictConfig, harvester: Any, settings: AnalysisSettings, device: torch.device) -> list:
    """Activation batches of the first validation sequences (with next-token predictions)."""
    datamodule = build_datamodule(cfg, harvester.tokenizer, ActivationSource(harvester))
    datamodule.setup("validate")
    log.info("analyse: harvesting %d validation sequences", settings.sample_sequences)
    return validation_sample(
        datamodule, settings.sample_sequences, batch_size=cfg.data.get("batch_size", 8), device=device
    )


def finish(loggers: list[Any], report: Path) -> None:
    lines = [f"report:         {report}  ({report.stat().st_size / 1e6:.1f} MB, opens offline in a browser)"]
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":
            lines.append(f"W&B run:        {logger.experiment.dir}  (offline: `wandb sync` uploads it)")
        logger.finalize("success")
        if type(logger).__name__ == "WandbLogger":
            logger.experiment.finish()
    print("\n".join(lines), flush=True)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="analyze")
def _main(cfg: DictConfig) -> None:
    with reported("bilae-analyze"):
        run(cfg)


def main() -> None:
    """Console script ``bilae-analyze``."""
    with reported("bilae-analyze"):
        _main()


if __name__ == "__main__":
    main()
