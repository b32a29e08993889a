"""Figure builders: plotly figures from analysis results. They never show, write or log anything."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go
from torch import Tensor

from bilae.analysis.composites import CompositeAtlas
from bilae.analysis.forms import Spectrum
from bilae.analysis.manifold import ManifoldSample
from bilae.analysis.sweep import lookup, pareto_front
from bilae.errors import DataError

TEMPLATE = "plotly_white"
DIVERGING = "RdBu_r"
MARGIN = dict(l=0, r=0, t=30, b=0)


def ged_figure(ged: Tensor, title: str = "Number of active elements in the overlap matrix") -> go.Figure:
    """GED of every latent's overlap row against its index."""
    fig = go.Figure(
        go.Scattergl(x=list(range(ged.numel())), y=ged.tolist(), mode="markers", marker=dict(size=3))
    )
    return fig.update_layout(
        template=TEMPLATE, title=title, xaxis_title="latent", yaxis_title="GED", margin=MARGIN
    )


def overlap_histogram(row: Tensor, title: str | None = None) -> go.Figure:
    """Histogram of one overlap row G[i] on [-1.1, 1.1] with a log count axis."""
    fig = go.Figure(go.Histogram(x=row.tolist(), xbins=dict(start=-1.1, end=1.1, size=0.02)))
    fig.update_xaxes(range=[-1.1, 1.1], title="overlap")
    fig.update_yaxes(type="log", title="count")
    return fig.update_layout(template=TEMPLATE, title=title, margin=MARGIN, showlegend=False)


def spectrum_figure(spectrum: Spectrum | Tensor, n: int | None = 64, title: str = "Spectrum") -> go.Figure:
    """Signed eigenvalues in order of |λ| (the first ``n``)."""
    eigenvalues = spectrum.eigenvalues if isinstance(spectrum, Spectrum) else spectrum
    values = eigenvalues[:n].tolist()
    fig = go.Figure(go.Scatter(x=list(range(1, len(values) + 1)), y=values, mode="lines+markers"))
    fig.add_hline(y=0, line_color="gray", line_width=1)
    return fig.update_layout(
        template=TEMPLATE, title=title, xaxis_title="index (by |λ|)", yaxis_title="λ", margin=MARGIN
    )


def manifold_figure(
    sample: ManifoldSample, hover: Sequence[str] | None = None, k: int | None = None, title: str | None = None
) -> go.Figure:
    """3-D scatter of the sample's first ``k`` points, coloured by x̂ᵀMx̂ on a diverging scale centred at 0."""
    points = sample if k is None else sample.top(k)
    coords = points.coords.float()
    text = [html.escape(t) for t in hover[: len(points)]] if hover is not None else None
    marker = dict(
        size=2, color=points.values.tolist(), colorscale=DIVERGING, cmid=0, colorbar=dict(title="x̂ᵀMx̂")
    )
    trace = go.Scatter3d(
        x=coords[:, 0].tolist(), y=coords[:, 1].tolist(), z=coords[:, 2].tolist(),
        mode="markers", marker=marker, hovertext=text, hoverinfo="text" if text else None,
    )  # fmt: skip
    axes = [f"u{i + 1} (λ={v:.3g})" for i, v in enumerate(sample.eigenvalues.tolist())]
    scene = dict(xaxis_title=axes[0], yaxis_title=axes[1], zaxis_title=axes[2])
    return go.Figure(trace).update_layout(template=TEMPLATE, title=title, scene=scene, margin=MARGIN)


def atlas_figure(atlas: CompositeAtlas, title: str = "Composite atlas") -> go.Figure:
    """Every composite as a point: rank against importance (log), coloured by the share captured by 3 eigenvalues."""
    text = [f"row {i}: support {s}" for i, s in enumerate(atlas.support.tolist())]
    marker = dict(
        size=4,
        color=atlas.captured.tolist(),
        colorscale="Viridis",
        cmin=0,
        cmax=1,
        colorbar=dict(title="captured"),
    )
    fig = go.Figure(
        go.Scattergl(
            x=atlas.rank.tolist(), y=atlas.importance.tolist(), mode="markers", marker=marker, hovertext=text
        )
    )
    fig.update_yaxes(type="log", title="importance (mean 1)")
    return fig.update_layout(template=TEMPLATE, title=title, xaxis_title="effective rank", margin=MARGIN)


def pareto_figure(
    runs: Sequence[dict[str, Any]], x: str = "density", y: str = "mse", labels: Sequence[str] | None = None
) -> go.Figure:
    """``y`` against ``x`` per kind (markers) with each kind's Pareto front (line), from :func:`load_sweep` rows.

    ``labels`` (one per run, e.g. :func:`~bilae.analysis.sweep.labels`: the swept values) are written beside the
    points and shown on hover.
    """
    groups: dict[str, list[tuple[float, float, str]]] = {}
    for i, run in enumerate(runs):
        vx, vy = lookup(run, x), lookup(run, y)
        if vx is not None and vy is not None:
            label = labels[i] if labels is not None else ""
            groups.setdefault(str(lookup(run, "kind") or "unknown"), []).append((float(vx), float(vy), label))
    if not groups:
        raise DataError(
            f"no run has both {x!r} and {y!r}; keys of the first run: {sorted(runs[0]) if runs else []}"
        )
    fig = go.Figure()
    for kind, points in sorted(groups.items()):
        front = pareto_front([(px, py) for px, py, _ in points])
        texts = [label for _, _, label in points]
        fig.add_scatter(
            x=[p[0] for p in points],
            y=[p[1] for p in points],
            mode="markers+text" if labels is not None else "markers",
            text=texts if labels is not None else None,
            textposition="top center",
            name=kind,
            legendgroup=kind,
        )
        fig.add_scatter(
            x=[p[0] for p in front],
            y=[p[1] for p in front],
            mode="lines",
            name=f"{kind} front",
            legendgroup=kind,
        )
    return fig.update_layout(
        template=TEMPLATE,
        xaxis_title=x,
        yaxis_title=y,
        title="Sweep: reconstruction vs density",
        margin=MARGIN,
    )
