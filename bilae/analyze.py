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

from bilae.analysis.overlap import bottleneck, check_indices
from bilae.analysis.session import AnalysisSession, harvest_sample, next_token_predictor
from bilae.autoencoders import Autoencoder
from bilae.autoencoders.checkpoint import CONFIG_FILE
from bilae.callbacks import (
    AnalysisCallback,
    AtlasCallback,
    EffectiveDimensionCallback,
    ExamplesCallback,
    ManifoldCallback,
    OverlapCallback,
    SpectrumCallback,
    log_panels,
    validation_tokens,
)
from bilae.cli import reported
from bilae.config import CONF_DIR
from bilae.errors import CheckpointError, UsageError, choices
from bilae.report import build_report, write_report
from bilae.train import build_datamodule, build_harvester, check_coder_fits, instantiate_clean

log = logging.getLogger("bilae")

ANALYSES: dict[str, type[AnalysisCallback]] = {
    "ged": EffectiveDimensionCallback,
    "overlap": OverlapCallback,
    "spectrum": SpectrumCallback,
    "atlas": AtlasCallback,
    "manifold": ManifoldCallback,
    "examples": ExamplesCallback,
}


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


def requested_features(cfg: DictConfig, m: int) -> list[int] | None:
    """``feature`` and/or ``features`` as a checked list (``None``: choose automatically)."""
    picked = ([] if cfg.feature is None else [cfg.feature]) + list(cfg.features or [])
    if not picked:
        return None
    return [int(i) for i in check_indices(picked, m)]


def selected_analyses(cfg: DictConfig, coder: Autoencoder) -> list[str]:
    """The analyses to run; asking for a bottleneck analysis of a kind without one is an error."""
    if cfg.analyses is None:
        has_bottleneck = getattr(coder, "down", None) is not None
        return [n for n, c in ANALYSES.items() if has_bottleneck or not c.needs_bottleneck]
    names = [str(n) for n in cfg.analyses]
    for name in names:
        if name not in ANALYSES:
            raise UsageError(f"unknown analysis {name!r}; valid: {choices(ANALYSES)}")
        if ANALYSES[name].needs_bottleneck:
            bottleneck(coder)  # raises, naming the kinds that have one
    return names


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} asked for, but no CUDA device is available; use device=cpu")
    return torch.device(device)


def run(cfg: DictConfig) -> Path:
    """Analyse the checkpoint, log to the configured loggers and write the report; returns the report's path."""
    L.seed_everything(cfg.seed, verbose=False)
    coder, source = load_checkpoint(cfg)
    log.info(
        "analyse: loaded %s (%s, %d latents) from %s", coder.config.name, coder.kind, coder.d_features, source
    )
    features = requested_features(cfg, coder.d_features)
    names = selected_analyses(cfg, coder)
    if cfg.model.layer is None:
        cfg.model.layer = coder.config.layer
    harvester = build_harvester(cfg.model)
    check_coder_fits(coder, harvester, source=source)
    device = resolve_device(cfg.device)
    harvester.to(device)
    session = AnalysisSession(coder.to(device), sample(cfg, harvester, device), harvester.tokenizer)
    latents = session.choose(features, cfg.n_features, cfg.skip_densest)
    log.info("analyse: %d sampled tokens; latents shown: %s", session.n_tokens, latents)
    loggers = [instantiate_clean(c) for c in (cfg.logger or {}).values()]
    for name in names:
        analyse_one(name, session, latents, cfg, loggers)
    start = time.perf_counter()
    summary = {"checkpoint": source, "model": f"{cfg.model.name} (layer {cfg.model.layer})"}
    report = build_report(
        session, latents, points=cfg.points, atlas_rows=cfg.atlas_rows,
        title=f"bilae report: {coder.config.name}", summary=summary,
    )  # fmt: skip
    path = write_report(cfg.report, report)
    log_panels(loggers, {}, {"analysis/time/report": time.perf_counter() - start}, step=0)
    finish(loggers, path)
    return path


def sample(cfg: DictConfig, harvester: Any, device: torch.device) -> list:
    """Activation batches of the first ``sample_sequences`` validation sequences (with next-token predictions)."""
    datamodule = build_datamodule(cfg, harvester.tokenizer)
    datamodule.setup("validate")
    ids, mask = validation_tokens(datamodule, cfg.sample_sequences)
    log.info(
        "analyse: harvesting %d sequences of %d tokens", ids.shape[0], ids.shape[1] if ids.ndim == 2 else 0
    )
    predict = next_token_predictor(harvester.model)
    return harvest_sample(
        harvester, ids, mask, batch_size=cfg.data.batch_size, predict=predict, device=device
    )


def analyse_one(
    name: str, session: AnalysisSession, latents: list[int], cfg: DictConfig, loggers: list[Any]
) -> None:
    options = {
        "manifold": {"points": cfg.points},
        "examples": {"k": cfg.examples},
        "atlas": {"rows": cfg.atlas_rows},
    }
    callback = ANALYSES[name](features=latents, **options.get(name, {}))
    start = time.perf_counter()
    panels = callback.panels_for(session)
    seconds = time.perf_counter() - start
    log_panels(loggers, panels, {f"analysis/time/{name}": seconds}, step=0)
    log.info("analyse: %s took %.2f s", name, seconds)


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
