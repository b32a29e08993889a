"""The one registry of analyses: named pure functions from an analysis session to named panels.

Each analysis is registered once (``bilae/analysis/analyses.py``) with what it needs: a bottleneck D, a sample of
real tokens, or a model with an LM head. The training callback, ``bilae-analyze`` and the HTML report all iterate
:data:`ANALYSES` through :func:`run_analyses`, so adding an analysis means one function there and, if it takes
options, one block in ``conf/analysis/default.yaml``. Pure: no logging, no W&B, no files.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import plotly.graph_objects as go

from bilae.analysis.session import AnalysisSession
from bilae.errors import UsageError, choices


@dataclass
class HtmlPanel:
    """An HTML fragment (already escaped), logged as ``wandb.Html``."""

    html: str


@dataclass
class TablePanel:
    """Rows of a table, logged as ``wandb.Table``."""

    rows: list[dict[str, Any]]


Panel: TypeAlias = go.Figure | HtmlPanel | TablePanel
Panels: TypeAlias = dict[str, Panel]
AnalysisFn: TypeAlias = Callable[..., Panels]


@dataclass(frozen=True)
class Analysis:
    """A registered analysis: ``fn(session, latents, **options) -> {"analysis/<name>/…": panel}``."""

    name: str
    fn: AnalysisFn
    title: str
    """Section title in the report."""
    note: str = ""
    """One line under the title."""
    needs_bottleneck: bool = False
    """Needs a bottleneck D (kinds mixed and combined)."""
    needs_tokens: bool = False
    """Needs a sample of real tokens (manifolds, contexts)."""
    needs_lm_head: bool = False
    """Needs the model's next-token predictions (a causal LM)."""
    viewer: bool = False
    """Its figures go into the report's manifold viewer (one dropdown) instead of a section."""
    needs_other: bool = False
    """Needs a second autoencoder to compare with (``bilae-analyze compare=<checkpoint>``)."""
    needs_option: str | None = None
    """An option that must be set (not null), e.g. the planted ground truth of ``recovery``."""

    def options(self) -> dict[str, Any]:
        """The keyword options of ``fn`` and their defaults."""
        params = list(inspect.signature(self.fn).parameters.values())[2:]
        return {p.name: p.default for p in params}

    def missing(self, session: AnalysisSession) -> str | None:
        """Why this analysis cannot run on ``session`` (``None`` if it can)."""
        if self.needs_bottleneck and not session.has_bottleneck:
            return f"skipped: a {session.kind!r} autoencoder has no bottleneck D; kinds with one: 'mixed' or 'combined'"
        if self.needs_tokens and not session.has_sample:
            return "skipped: no activation sample (no real tokens to project or quote)"
        if self.needs_lm_head and not session.has_predictions:
            return "skipped: the model has no LM head, so there are no next-token predictions"
        return None

    def absent(self, session: AnalysisSession, options: dict[str, Any]) -> str | None:
        """Why this opt-in analysis has nothing to work on: no second coder, or its required option unset."""
        if self.needs_other and session.other is None:
            return (
                "skipped: no second autoencoder to compare with (bilae-analyze compare=<checkpoint folder>)"
            )
        if self.needs_option is not None and {**self.options(), **options}.get(self.needs_option) is None:
            return f"skipped: option analysis.options.{self.name}.{self.needs_option} is not set"
        return None


ANALYSES: dict[str, Analysis] = {}


def register(
    name: str,
    *,
    title: str,
    note: str = "",
    needs_bottleneck: bool = False,
    needs_tokens: bool = False,
    needs_lm_head: bool = False,
    viewer: bool = False,
    needs_other: bool = False,
    needs_option: str | None = None,
    registry: dict[str, Analysis] | None = None,
) -> Callable[[AnalysisFn], AnalysisFn]:
    """Decorator: register ``fn(session, latents, **options)`` as analysis ``name`` (see :class:`Analysis`)."""
    target = ANALYSES if registry is None else registry

    def add(fn: AnalysisFn) -> AnalysisFn:
        if name in target:
            raise UsageError(f"analysis {name!r} is registered twice")
        target[name] = Analysis(
            name,
            fn,
            title,
            note,
            needs_bottleneck,
            needs_tokens,
            needs_lm_head,
            viewer,
            needs_other,
            needs_option,
        )
        return fn

    return add


@dataclass
class AnalysisSettings:
    """What to analyse and show (``conf/analysis/default.yaml``), shared by the callback and ``bilae-analyze``."""

    run: list[str] | None = None
    """Analyses to run (``None``: every registered one that applies to the coder and the sample)."""
    features: list[int] | None = None
    """Latents to show (``None``: chosen automatically, see :meth:`AnalysisSession.choose`)."""
    n_features: int = 4
    """How many latents to choose automatically."""
    skip_densest: int = 5
    """Latents of highest GED to pass over when choosing (dense and hard to read, as the notebook advises)."""
    sample_sequences: int = 16
    """Validation sequences harvested for the activation sample."""
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Keyword options per analysis, e.g. ``{"manifold": {"points": 2000}}``."""

    def __post_init__(self) -> None:
        if self.n_features <= 0 or self.skip_densest < 0 or self.sample_sequences < 0:
            raise UsageError(
                f"analysis.n_features must be positive and skip_densest, sample_sequences >= 0; got "
                f"n_features={self.n_features}, skip_densest={self.skip_densest}, "
                f"sample_sequences={self.sample_sequences}"
            )

    @classmethod
    def from_config(cls, values: Any) -> AnalysisSettings:
        """From the ``analysis`` config node (a DictConfig or dict): known keys as fields, the rest as options."""
        from omegaconf import DictConfig, OmegaConf

        data = (
            OmegaConf.to_container(values, resolve=True) if isinstance(values, DictConfig) else dict(values)
        )
        assert isinstance(data, dict)
        known = {k: data.pop(k) for k in ("run", "features", "n_features", "skip_densest", "sample_sequences")
                 if k in data}  # fmt: skip
        options = {str(k): dict(v or {}) for k, v in data.pop("options", {}).items()}
        return cls(**known, options=options)


def selected(settings: AnalysisSettings, registry: dict[str, Analysis] | None = None) -> list[Analysis]:
    """The analyses ``settings.run`` names (all registered ones when ``None``), checked, in registry order."""
    registry = ANALYSES if registry is None else registry
    names = list(registry) if settings.run is None else [str(n) for n in settings.run]
    for name in names:
        if name not in registry:
            raise UsageError(f"unknown analysis {name!r}; valid: {choices(registry)}")
    for name, given in settings.options.items():
        if name not in registry:
            raise UsageError(f"options for unknown analysis {name!r}; valid: {choices(registry)}")
        bad = sorted(set(given) - set(registry[name].options()))
        if bad:
            raise UsageError(
                f"unknown option {bad[0]!r} of analysis {name!r}; valid: {choices(registry[name].options())}"
            )
    return [registry[name] for name in registry if name in names]


@dataclass
class AnalysisResult:
    """What one analysis gave: its panels, or why it was skipped, and how long it took."""

    analysis: Analysis
    panels: Panels
    skipped: str | None
    seconds: float


def run_analyses(
    session: AnalysisSession,
    latents: Sequence[int],
    settings: AnalysisSettings,
    registry: dict[str, Analysis] | None = None,
    *,
    strict: bool = False,
) -> list[AnalysisResult]:
    """Run every selected analysis on ``session`` for ``latents``.

    An analysis whose needs are not met is skipped with its reason; ``strict`` makes asking for one by name
    (``settings.run``) an error instead (``bilae-analyze``: the user asked for it explicitly). An opt-in analysis
    without its input (``compare`` without a second coder, ``recovery`` without planted manifolds) is left out
    unless asked for by name.
    """
    results = []
    for analysis in selected(settings, registry):
        options = settings.options.get(analysis.name, {})
        reason = analysis.missing(session) or analysis.absent(session, options)
        if reason is not None and settings.run is None and analysis.absent(session, options) is not None:
            continue
        if reason is not None and strict and settings.run is not None:
            raise UsageError(f"analysis {analysis.name!r} cannot run: {reason.removeprefix('skipped: ')}")
        if reason is not None:
            results.append(AnalysisResult(analysis, {}, reason, 0.0))
            continue
        start = time.perf_counter()
        panels = analysis.fn(session, list(latents), **options)
        results.append(AnalysisResult(analysis, panels, None, time.perf_counter() - start))
    return results


def all_panels(results: Iterable[AnalysisResult]) -> Panels:
    """Every panel of ``results`` in one dict."""
    return {key: panel for result in results for key, panel in result.panels.items()}
