"""Analysis callbacks: thin adapters that decide when to run an analysis, call it, and log what it returns.

Every callback runs every ``every_n_steps`` optimiser steps (``None``: only at fit end) and at fit end, on rank
zero only. They share one :class:`~bilae.analysis.session.AnalysisSession` per step (a small sample of the
validation sequences, harvested once), so the same overlaps or manifolds are never computed twice. Figures go
to W&B under ``analysis/…`` (``wandb.Plotly``, ``wandb.Html``, ``wandb.Table``); with any other logger they are
computed but not logged. Each callback's wall time is logged as ``analysis/time/<name>``.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import lightning as L
import plotly.graph_objects as go
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from bilae.analysis import (
    context_records,
    ged_figure,
    manifold_figure,
    overlap_histogram,
    spectrum_figure,
    to_html,
    to_rows,
)
from bilae.analysis.session import AnalysisSession, harvest_sample, next_token_predictor
from bilae.autoencoders import Autoencoder
from bilae.errors import BilaeError, DataError, UsageError
from bilae.report import atlas_view, build_report, write_report

log = logging.getLogger("bilae")


@dataclass
class HtmlPanel:
    """An HTML fragment to log (``wandb.Html``)."""

    html: str


@dataclass
class TablePanel:
    """Rows of a table to log (``wandb.Table``)."""

    rows: list[dict[str, Any]]


Panel: TypeAlias = go.Figure | HtmlPanel | TablePanel


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


def log_panels(
    loggers: Sequence[Any], panels: dict[str, Panel], scalars: dict[str, float], step: int
) -> None:
    """Media to every W&B logger; scalars (timings) to every logger."""
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":
            media = {key: to_wandb(panel) for key, panel in panels.items()}
            logger.experiment.log({**media, **scalars, "trainer/global_step": step})
        elif scalars:
            logger.log_metrics(scalars, step=step)


# ------------------------------------------------------------------------------------------ shared sample
_SESSIONS: weakref.WeakKeyDictionary[Any, dict[tuple, AnalysisSession]] = weakref.WeakKeyDictionary()


def session_for(
    trainer: L.Trainer, harvester: Any, coder: Autoencoder, sequences: int
) -> tuple[AnalysisSession, float]:
    """The session of ``coder`` at this step (shared by every callback) and the seconds spent creating it now.

    The sample is the first ``sequences`` validation sequences, harvested once per step; without a harvester
    (training from an activation cache) the session has no sample and only weight analyses run.
    """
    key = (trainer.global_step, sequences)
    sessions = _SESSIONS.setdefault(trainer, {})
    if key + (id(coder),) in sessions:
        return sessions[key + (id(coder),)], 0.0
    start = time.perf_counter()
    shared = next((v for k, v in sessions.items() if k[:2] == key), None)  # another coder, same step
    batches = shared.batches if shared is not None else sample_batches(trainer, harvester, sequences)
    tokenizer = harvester.tokenizer if harvester is not None else None
    session = AnalysisSession(coder, batches, tokenizer)
    _SESSIONS[trainer] = {k: v for k, v in sessions.items() if k[:2] == key} | {key + (id(coder),): session}
    return session, time.perf_counter() - start


def sample_batches(trainer: L.Trainer, harvester: Any, sequences: int) -> list:
    if harvester is None:
        log.info("analysis: no LM in this run (activation cache): manifolds and contexts are skipped")
        return []
    ids, mask = validation_tokens(trainer.datamodule, sequences)  # type: ignore[attr-defined]
    log.info("analysis: harvesting %d validation sequences for the analysis sample", len(ids))
    predict = next_token_predictor(harvester.model)
    return harvest_sample(harvester, ids, mask, batch_size=8, predict=predict, device=harvester.device)


def validation_tokens(datamodule: Any, sequences: int) -> tuple[Tensor, Tensor]:
    """The first ``sequences`` held-out sequences (training ones without a validation split), read from memory
    without advancing any loader's resumable state."""
    for split in ("val", "train"):
        tokens = getattr(datamodule, split, None)
        if tokens is not None and hasattr(tokens, "input_ids"):
            return tokens.input_ids[:sequences], tokens.attention_mask[:sequences]
    raise DataError(
        "the analysis sample needs in-memory token sequences (an ActivationDataModule with a validation split)"
    )


# ----------------------------------------------------------------------------------------------- callbacks
class AnalysisCallback(L.Callback):
    """Base class: when to run (every ``every_n_steps`` and at fit end, rank zero), timing and logging.

    With several autoencoders trained together, each is analysed and logged under ``<name>/analysis/…``.

    Args:
        every_n_steps: run every this many optimiser steps as well as at fit end (``None``: fit end only).
        features: latents to show (``None``: chosen automatically, see :meth:`AnalysisSession.choose`).
        n_features: how many latents to choose automatically.
        skip_densest: latents of highest GED to pass over when choosing (they are dense and hard to read).
        sample_sequences: validation sequences harvested for the sample.
    """

    name = "analysis"
    needs_bottleneck = False

    def __init__(
        self,
        every_n_steps: int | None = None,
        features: Sequence[int] | None = None,
        n_features: int = 4,
        skip_densest: int = 5,
        sample_sequences: int = 16,
    ) -> None:
        if every_n_steps is not None and every_n_steps <= 0:
            raise UsageError(f"every_n_steps must be a positive number of steps or null, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.features = list(features) if features is not None else None
        self.n_features, self.skip_densest = n_features, skip_densest
        self.sample_sequences = sample_sequences
        self._last_step: int | None = None
        self._said_skip = False
        self.panels: dict[str, Panel] = {}
        self.seconds: float | None = None
        self.several = False  # several coders: prefix keys (and report files) with each coder's name

    def panels_for(self, session: AnalysisSession) -> dict[str, Panel]:
        """The figures/tables of this analysis, keyed by their ``analysis/…`` name."""
        raise NotImplementedError

    def latents(self, session: AnalysisSession) -> list[int]:
        return session.choose(self.features, self.n_features, self.skip_densest)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self.run(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.run(trainer, pl_module)

    @rank_zero_only
    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Analyse every coder once per step (fit end right after a periodic run at that step is a no-op)."""
        if self._last_step == trainer.global_step:
            return
        self._last_step = trainer.global_step
        coders = list(getattr(pl_module, "autoencoders", None) or [pl_module.coder])
        self.several = len(coders) > 1
        for coder in coders:
            prefix = f"{coder.config.name}/" if self.several else ""
            self.run_one(trainer, getattr(pl_module, "harvester", None), coder, prefix)

    def run_one(self, trainer: L.Trainer, harvester: Any, coder: Autoencoder, prefix: str) -> None:
        try:
            session, sample_seconds = session_for(trainer, harvester, coder, self.sample_sequences)
            if sample_seconds:
                scalars = {f"{prefix}analysis/time/sample": sample_seconds}
                log_panels(trainer.loggers, {}, scalars, trainer.global_step)
            if self.needs_bottleneck and not session.has_bottleneck:
                self._skip(session)
                return
            start = time.perf_counter()
            panels = self.panels_for(session)
        except BilaeError as err:  # a bad `features` index, an empty sample: say so and keep training
            log.warning("analysis: %s failed: %s", self.name, err)
            return
        self.seconds = time.perf_counter() - start
        self.panels = {prefix + key: panel for key, panel in panels.items()}
        scalars = {f"{prefix}analysis/time/{self.name}": self.seconds}
        log_panels(trainer.loggers, self.panels, scalars, trainer.global_step)
        log.info(
            "analysis: %s%s at step %d took %.2f s", prefix, self.name, trainer.global_step, self.seconds
        )

    def _skip(self, session: AnalysisSession) -> None:
        if not self._said_skip:
            log.info(
                "analysis: %s skipped: a %r autoencoder has no bottleneck D (kinds with one: mixed, combined)",
                self.name,
                session.kind,
            )
            self._said_skip = True


class EffectiveDimensionCallback(AnalysisCallback):
    """GED of every overlap row G[i] = (D̂ᵀD̂)[i] against the latent index: ``analysis/ged``."""

    name = "ged"
    needs_bottleneck = True

    def panels_for(self, session: AnalysisSession) -> dict[str, Panel]:
        return {"analysis/ged": ged_figure(session.stats.ged)}


class OverlapCallback(AnalysisCallback):
    """Histogram of the overlap row G[i] of each chosen latent: ``analysis/overlap/<i>``."""

    name = "overlap"
    needs_bottleneck = True

    def panels_for(self, session: AnalysisSession) -> dict[str, Panel]:
        return {
            f"analysis/overlap/{i}": overlap_histogram(
                session.overlap_row(i), title=f"Overlaps of latent {i}"
            )
            for i in self.latents(session)
        }


class SpectrumCallback(AnalysisCallback):
    """Eigenvalues of the quadratic form of each chosen latent: ``analysis/spectrum/<i>``."""

    name = "spectrum"

    def panels_for(self, session: AnalysisSession) -> dict[str, Panel]:
        return {
            f"analysis/spectrum/{i}": spectrum_figure(session.spectrum(i), title=f"Spectrum of latent {i}")
            for i in self.latents(session)
        }


class AtlasCallback(AnalysisCallback):
    """Rank, importance and captured share of the bottleneck composites B_k: ``analysis/atlas``.

    Args:
        rows: composites to analyse, those with the largest ‖D_k‖ (``None``: all; each dense one costs a
            d×d eigen-decomposition).
        **kwargs: see :class:`AnalysisCallback`.
    """

    name = "atlas"
    needs_bottleneck = True

    def __init__(self, rows: int | None = 64, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rows = rows

    def panels_for(self, session: AnalysisSession) -> dict[str, Panel]:
        return {"analysis/atlas": atlas_view(session, self.rows)}


class ManifoldCallback(AnalysisCallback):
    """3-D projection of real validation tokens on each chosen latent's top eigenvectors: ``analysis/manifold/<i>``.

    Args:
        points: tokens kept per manifold (largest |x̂ᵀMx̂|).
        **kwargs: see :class:`AnalysisCallback`.
    """

    name = "manifold"

    def __init__(self, points: int = 2000, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.points = points

    def panels_for(self, session: AnalysisSession) -> dict[str, Panel]:
        panels: dict[str, Panel] = {}
        for i in self.latents(session):
            sample, hover = session.manifold(i, self.points)
            panels[f"analysis/manifold/{i}"] = manifold_figure(sample, hover, title=f"Manifold of latent {i}")
        return panels


class ExamplesCallback(AnalysisCallback):
    """Max- and min-activating contexts of the chosen latents: ``analysis/examples`` (HTML) and
    ``analysis/examples_table`` (a table).

    Args:
        k: contexts per latent and direction.
        **kwargs: see :class:`AnalysisCallback`.
    """

    name = "examples"

    def __init__(self, k: int = 5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.k = k

    def panels_for(self, session: AnalysisSession) -> dict[str, Panel]:
        latents = self.latents(session)
        examples = session.examples(latents, self.k)
        records = {
            i: [r for w in ("max", "min") for r in context_records(examples, session.tokenizer, i, w)]
            for i in latents
        }
        html = "\n".join(to_html(r, title=f"latent {i}") for i, r in records.items())
        rows = [row for r in records.values() for row in to_rows(r)]
        return {"analysis/examples": HtmlPanel(html), "analysis/examples_table": TablePanel(rows)}


class ReportCallback(AnalysisCallback):
    """At fit end, writes the self-contained HTML report (``report.html``) into the run directory.

    Args:
        path: where to write the report.
        points: tokens per manifold in the viewer.
        **kwargs: see :class:`AnalysisCallback` (``every_n_steps`` rewrites the report periodically).
    """

    name = "report"

    def __init__(
        self, path: str = "report.html", points: int = 2000, atlas_rows: int | None = 64, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.path, self.points, self.atlas_rows = Path(path), points, atlas_rows

    def panels_for(self, session: AnalysisSession) -> dict[str, Panel]:
        name = session.coder.config.name
        path = (
            self.path.with_name(f"{self.path.stem}-{name}{self.path.suffix}") if self.several else self.path
        )
        report = build_report(
            session, self.latents(session), points=self.points, atlas_rows=self.atlas_rows,
            title=f"bilae report: {name}",
        )  # fmt: skip
        write_report(path, report)
        log.info("analysis: report written to %s", path)
        return {}
