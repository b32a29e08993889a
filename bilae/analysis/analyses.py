"""Every analysis bilae shows, each registered once with its needs (see :mod:`bilae.analysis.registry`).

An analysis is ``fn(session, latents, **options) -> {"analysis/<name>/…": panel}``: pure, computed from the
autoencoder's weights first and from the session's activation sample only to visualise. Keyword options come from
``conf/analysis/default.yaml`` (``analysis.options.<name>``). Registry order is report order.
"""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go

from bilae.analysis.examples import context_records, to_html, to_rows
from bilae.analysis.figures import (
    atlas_figure,
    ged_figure,
    manifold_figure,
    overlap_histogram,
    spectrum_figure,
)
from bilae.analysis.registry import HtmlPanel, Panels, TablePanel, register
from bilae.analysis.session import AnalysisSession


@register(
    "manifold",
    title="Manifolds",
    note="Real tokens projected on the three eigenvectors of largest |λ| of each latent's quadratic form, "
    "coloured by x̂ᵀMx̂; hover a point for its context [token] → the model's prediction.",
    needs_tokens=True,
    viewer=True,
)
def manifolds(session: AnalysisSession, latents: Sequence[int], points: int = 2000) -> Panels:
    """3-D projection of the sample's tokens on each latent's top eigenvectors (one figure per latent)."""
    panels: Panels = {}
    for i in latents:
        sample, hover = session.manifold(i, points)
        lam = ", ".join(f"{v:.3g}" for v in sample.eigenvalues.tolist())
        panels[f"analysis/manifold/{i}"] = manifold_figure(sample, hover, title=f"latent {i} (λ: {lam})")
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


@register("spectrum", title="Spectra", note="eigenvalues of each latent's quadratic form, by |λ|")
def spectra(session: AnalysisSession, latents: Sequence[int]) -> Panels:
    """Eigenvalues of each shown latent's quadratic form."""
    return {
        f"analysis/spectrum/{i}": spectrum_figure(session.spectrum(i), title=f"Spectrum of latent {i}")
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
        i: [r for w in ("max", "min") for r in context_records(found, session.tokenizer, i, w)] for i in latents
    }
    html = "\n".join(to_html(r, title=f"latent {i}") for i, r in records.items())
    rows = [row for r in records.values() for row in to_rows(r)]
    return {"analysis/examples": HtmlPanel(html), "analysis/examples_table": TablePanel(rows)}


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
