"""Every analysis bilae shows, each registered once with its needs (see :mod:`bilae.analysis.registry`).

An analysis is ``fn(session, latents, **options) -> {"analysis/<name>/…": panel}``: pure, computed from the
autoencoder's weights first and from the session's activation sample only to visualise. Keyword options come from
``conf/analysis/default.yaml`` (``analysis.options.<name>``). Registry order is report order.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import plotly.graph_objects as go

from bilae.analysis.compare import compare_coders, matches_figure, subspace_figure
from bilae.analysis.examples import context_records, to_html, to_rows
from bilae.analysis.figures import (
    atlas_figure,
    ged_figure,
    manifold_figure,
    overlap_histogram,
    spectrum_figure,
)
from bilae.analysis.forms import WEIGHTS, check_weights
from bilae.analysis.recovery import recover_planted, recovery_figure
from bilae.analysis.registry import HtmlPanel, Panels, TablePanel, register
from bilae.analysis.session import AnalysisSession
from bilae.synthetic import PlantedManifolds


@register(
    "manifold",
    title="Manifolds",
    note="Real tokens projected on the three eigenvectors of largest |λ| of each latent's quadratic form "
    "(the sum of l rᵀ over its top-5 overlapping latents, weighted as the figure title says), coloured by x̂ᵀMx̂; "
    "hover a point for its context [token] → the model's prediction.",
    needs_tokens=True,
    viewer=True,
)
def manifolds(
    session: AnalysisSession, latents: Sequence[int], points: int = 2000, weights: str = "uniform"
) -> Panels:
    """3-D projection of the sample's tokens on each latent's top eigenvectors (one figure per latent).

    ``weights`` (:data:`~bilae.analysis.forms.WEIGHTS`) weighs the latents of each form; a weighting other than
    the default ``uniform`` is part of the key, ``analysis/manifold/<weights>/<i>``.
    """
    check_weights(weights)
    panels: Panels = {}
    for i in latents:
        sample, hover = session.manifold(i, points, weights)
        lam = ", ".join(f"{v:.3g}" for v in sample.eigenvalues.tolist())
        title = f"latent {i} ({weights} weights; λ: {lam})"
        panels[weighted_key("manifold", weights, i)] = manifold_figure(sample, hover, title=title)
    return panels


@register(
    "ged",
    title="Effective dimension",
    note="GED of each overlap row G[i]: about how many latents the bottleneck composes with latent i",
    needs_bottleneck=True,
)
def effective_dimension(session: AnalysisSession, latents: Sequence[int]) -> Panels:
    """GED of every overlap row against the latent index."""
    return {"analysis/ged": ged_figure(session.stats.ged)}


@register(
    "overlap",
    title="Overlaps",
    note="histograms of G[i] for the shown latents",
    needs_bottleneck=True,
)
def overlaps(session: AnalysisSession, latents: Sequence[int]) -> Panels:
    """Histogram of the overlap row G[i] of each shown latent."""
    return {
        f"analysis/overlap/{i}": overlap_histogram(session.overlap_row(i), title=f"Overlaps of latent {i}")
        for i in latents
    }


@register(
    "spectrum",
    title="Spectra",
    note="eigenvalues of each latent's quadratic form by |λ|, its latents weighted as the figure title says",
)
def spectra(session: AnalysisSession, latents: Sequence[int], weights: str = "uniform") -> Panels:
    """Eigenvalues of each shown latent's quadratic form (key ``analysis/spectrum/[<weights>/]<i>``)."""
    check_weights(weights)
    return {
        weighted_key("spectrum", weights, i): spectrum_figure(
            session.spectrum(i, weights), title=f"Spectrum of latent {i} ({weights} weights)"
        )
        for i in latents
    }


@register(
    "atlas",
    title="Composite atlas",
    note="one point per bottleneck row B_k: effective rank against importance",
    needs_bottleneck=True,
)
def atlas(session: AnalysisSession, latents: Sequence[int], rows: int | None = 64) -> Panels:
    """Rank, importance and captured share of the bottleneck composites (the ``rows`` largest ‖D_k‖)."""
    return {"analysis/atlas": atlas_view(session, rows)}


@register(
    "examples",
    title="Max- and min-activating contexts",
    note="in the sampled tokens",
    needs_tokens=True,
)
def examples(session: AnalysisSession, latents: Sequence[int], k: int = 5) -> Panels:
    """Max- and min-activating contexts of the shown latents, as HTML and as a table."""
    found = session.examples(list(latents), k)
    records = {
        i: [r for w in ("max", "min") for r in context_records(found, session.tokenizer, i, w)]
        for i in latents
    }
    html = "\n".join(to_html(r, title=f"latent {i}") for i, r in records.items())
    rows = [row for r in records.values() for row in to_rows(r)]
    return {"analysis/examples": HtmlPanel(html), "analysis/examples_table": TablePanel(rows)}


@register(
    "compare",
    title="Comparison with another autoencoder",
    note="principal-angle cosines between the input subspaces (top eigenvectors of Σ_j l_j l_jᵀ + r_j r_jᵀ), and "
    "each latent's best |cosine| of symmetrised l⊗r forms among the other coder's latents",
    needs_other=True,
)
def compare(session: AnalysisSession, latents: Sequence[int], rank: int = 16, chunk: int = 1024) -> Panels:
    """Subspace cosines and best latent matches of the session's coder against ``session.other``."""
    assert session.other is not None
    other = session.other.to(session.device)
    found = compare_coders(session.coder, other, rank=rank, chunk=chunk)
    name = f"vs {other.config.name}"
    summary = (
        f"<p>compared with <b>{html.escape(str(other.config.name))}</b>: mean principal cosine "
        f"{float(found.cosines.mean()):.4f} over {len(found.cosines)} directions; mean best latent match "
        f"{found.mean_best:.4f} over {len(found.best)} latents</p>"
    )
    return {
        "analysis/compare/subspace": subspace_figure(found.cosines, title=f"Input subspaces {name}"),
        "analysis/compare/latents": matches_figure(found.best, title=f"Best match of each latent {name}"),
        "analysis/compare/summary": HtmlPanel(summary),
    }


@register(
    "recovery",
    title="Planted manifolds recovered",
    note="each planted manifold (data=planted) against the composite, latent or latent cluster whose top "
    "eigenvectors span it best: principal-angle cosines with its linear span (1: spanned exactly)",
    needs_option="planted",
)
def recovery(
    session: AnalysisSession, latents: Sequence[int], planted: str | None = None, threshold: float = 0.9
) -> Panels:
    """How well the coder spans the planted manifolds saved at ``planted`` (``planted.safetensors``)."""
    assert planted is not None
    found = recover_planted(session.coder, PlantedManifolds.load(planted))
    rows = [
        {
            "manifold": n,
            "best candidate": c,
            "min cosine": float(v.min()),
            "cosines": [round(float(x), 4) for x in v],
        }
        for n, c, v in zip(found.names, found.candidates, found.cosines)
    ]
    items = "".join(
        f"<li>{html.escape(n)}: {float(v.min()):.3f} ({html.escape(c)})</li>"
        for n, c, v in zip(found.names, found.candidates, found.cosines)
    )
    summary = (
        f"<p>recovered {found.recovered(threshold):.0%} of {len(rows)} planted manifolds at min cosine ≥ "
        f"{threshold:g}</p><ul>{items}</ul>"
    )
    return {
        "analysis/recovery/cosines": recovery_figure(found, threshold),
        "analysis/recovery/summary": HtmlPanel(summary),
        "analysis/recovery/table": TablePanel(rows),
    }


def weighted_key(name: str, weights: str, latent: int) -> str:
    """``analysis/<name>/<i>`` for the default weighting, ``analysis/<name>/<weights>/<i>`` for the others."""
    return f"analysis/{name}/{latent}" if weights == WEIGHTS[0] else f"analysis/{name}/{weights}/{latent}"


def atlas_view(session: AnalysisSession, rows: int | None) -> go.Figure:
    """The atlas figure, its hover texts naming the real bottleneck rows."""
    found, picked = session.atlas(rows)
    shown = (
        ""
        if rows is None or len(picked) == session.coder.config.d_bottleneck
        else f" ({len(picked)} largest rows)"
    )
    fig = atlas_figure(found, title=f"Composite atlas{shown}")
    fig.data[0].hovertext = [f"row {k}: support {s}" for k, s in zip(picked.tolist(), found.support.tolist())]
    return fig
