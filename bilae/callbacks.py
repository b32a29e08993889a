"""The analysis callback: a thin adapter that decides when to run the registered analyses and logs what they give.

It runs every ``every_n_steps`` optimiser steps (``None``: only at fit end) and at fit end, on rank zero only.
Each run takes one small sample of validation sequences (harvested, or read from the activation cache of a run that
trains from one), builds one
:class:`~bilae.analysis.session.AnalysisSession` per autoencoder, runs :func:`~bilae.analysis.registry.run_analyses`
and logs the panels to W&B under ``analysis/…`` (``wandb.Plotly``, ``wandb.Html``, ``wandb.Table``); with any other
logger they are computed but only their timings are logged (``analysis/time/<name>``). At fit end it also writes
the self-contained HTML report from the same panels.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import plotly.graph_objects as go
from lightning.pytorch.utilities import rank_zero_only

from bilae.analysis.registry import (
    AnalysisResult,
    AnalysisSettings,
    HtmlPanel,
    Panel,
    Panels,
    all_panels,
    run_analyses,
)
from bilae.analysis.session import AnalysisSession, predictions_note, sample_tokenizer, validation_sample
from bilae.autoencoders import Autoencoder
from bilae.errors import BilaeError, UsageError
from bilae.report import build_report, write_report

log = logging.getLogger("bilae")


# ------------------------------------------------------------------------------------------------- logging
def to_wandb(panel: Panel) -> Any:
    """The W&B media object of a panel."""
    import wandb

    if isinstance(panel, go.Figure):
        return wandb.Plotly(panel)
    if isinstance(panel, HtmlPanel):
        return wandb.Html(panel.html, inject=False)
    columns = list(panel.rows[0]) if panel.rows else ["empty"]
    return wandb.Table(columns=columns, data=[list(r.values()) for r in panel.rows])


def log_panels(loggers: Sequence[Any], panels: Panels, scalars: dict[str, float], step: int) -> None:
    """Media to every W&B logger; scalars (timings) to every logger."""
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":
            media = {key: to_wandb(panel) for key, panel in panels.items()}
            logger.experiment.log({**media, **scalars, "trainer/global_step": step})
        elif scalars:
            logger.log_metrics(scalars, step=step)


def log_results(
    loggers: Sequence[Any], results: Sequence[AnalysisResult], step: int, prefix: str = ""
) -> Panels:
    """Log the panels and timings of ``results`` under ``prefix``; returns the panels logged."""
    panels = {prefix + key: panel for key, panel in all_panels(results).items()}
    timings = {f"{prefix}analysis/time/{r.analysis.name}": r.seconds for r in results if r.skipped is None}
    log_panels(loggers, panels, timings, step)
    return panels


# ------------------------------------------------------------------------------------------------ callback
class AnalysisCallback(L.Callback):
    """Runs the registered analyses during and after training, logs them, and writes the report at fit end.

    With several autoencoders trained together, each is analysed and logged under ``<name>/analysis/…`` and gets
    its own report (``report-<name>.html``).

    Args:
        settings: which analyses, latents and options (``conf/analysis/default.yaml``; a dict or
            :class:`~bilae.analysis.registry.AnalysisSettings`).
        every_n_steps: also run every this many optimiser steps (``None``: fit end only).
        report: where to write the HTML report at fit end (``None``: no report).
    """

    def __init__(
        self,
        settings: Any = None,
        every_n_steps: int | None = None,
        report: str | None = "report.html",
    ) -> None:
        if every_n_steps is not None and every_n_steps <= 0:
            raise UsageError(f"every_n_steps must be a positive number of steps or null, got {every_n_steps}")
        if not isinstance(settings, AnalysisSettings):
            settings = AnalysisSettings.from_config(settings or {})
        self.settings = settings
        self.every_n_steps = every_n_steps
        self.report = Path(report) if report else None
        self.panels: Panels = {}
        self.results: dict[str, list[AnalysisResult]] = {}
        self.sessions: dict[str, tuple[AnalysisSession, list[int]]] = {}
        self.predictions = ""
        self._last_step: int | None = None
        self._said: set[str] = set()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self.run(trainer, pl_module, final=False)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.run(trainer, pl_module, final=True)

    @rank_zero_only
    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, *, final: bool) -> None:
        """Analyse every coder once per step, on one shared sample (a periodic run at the last step is reused)."""
        if self._last_step != trainer.global_step:
            self._last_step = trainer.global_step
            self._analyse(trainer, list(pl_module.coders))  # type: ignore[arg-type]
        if final and self.report is not None:
            self._write_reports(trainer)

    def _analyse(self, trainer: L.Trainer, coders: list[Autoencoder]) -> None:
        start = time.perf_counter()
        datamodule: Any = trainer.datamodule  # type: ignore[attr-defined]
        batches = self._sample(datamodule)
        tokenizer = sample_tokenizer(datamodule)
        self.predictions = predictions_note(batches, datamodule.activations.harvester)
        log_panels(
            trainer.loggers, {}, {"analysis/time/sample": time.perf_counter() - start}, trainer.global_step
        )
        self.panels, self.sessions = {}, {}
        for coder in coders:
            prefix = f"{coder.config.name}/" if len(coders) > 1 else ""
            session = AnalysisSession(coder, batches, tokenizer)
            try:
                latents = session.choose(
                    self.settings.features, self.settings.n_features, self.settings.skip_densest
                )
                results = run_analyses(session, latents, self.settings)
            except BilaeError as err:  # a bad `features` index: say so and keep training
                log.warning("analysis: %s", err)
                continue
            self.sessions[coder.config.name] = (session, latents)
            self.results[coder.config.name] = results
            self.panels |= log_results(trainer.loggers, results, trainer.global_step, prefix)
            done = ", ".join(f"{r.analysis.name} {r.seconds:.2f} s" for r in results if r.skipped is None)
            log.info("analysis: %sstep %d: %s", prefix, trainer.global_step, done)
            self._say_skipped(prefix, results, has_sample=bool(batches))

    def _sample(self, datamodule: Any) -> list:
        """The activation sample (harvested, or read from the cache); on failure one warning says why."""
        try:
            batches = validation_sample(datamodule, self.settings.sample_sequences)
        except BilaeError as err:
            batches, reason = [], str(err)
        else:
            reason = "no language model and no activation cache to take it from"
        if not batches and "sample" not in self._said:
            self._said.add("sample")
            log.warning("analysis: no activation sample (%s): manifolds and contexts are skipped", reason)
        return batches

    def _say_skipped(self, prefix: str, results: list[AnalysisResult], *, has_sample: bool) -> None:
        """Each skipped analysis once, with its reason (those skipped for want of a sample were said already)."""
        for r in results:
            key = prefix + r.analysis.name
            if r.skipped is None or key in self._said or (not has_sample and r.analysis.needs_tokens):
                continue
            self._said.add(key)
            log.info("analysis: %s%s %s", prefix, r.analysis.name, r.skipped)

    def _write_reports(self, trainer: L.Trainer) -> None:
        assert self.report is not None
        for name, (session, latents) in self.sessions.items():
            path = self.report
            if len(self.sessions) > 1:
                path = path.with_name(f"{path.stem}-{name}{path.suffix}")
            start = time.perf_counter()
            summary = {"next-token predictions": self.predictions}
            report = build_report(
                session, latents, self.results[name], title=f"bilae report: {name}", summary=summary
            )
            write_report(path, report)
            prefix = f"{name}/" if len(self.sessions) > 1 else ""
            seconds = time.perf_counter() - start
            log_panels(trainer.loggers, {}, {f"{prefix}analysis/time/report": seconds}, trainer.global_step)
            log.info("analysis: report written to %s", path)
