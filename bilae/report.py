"""A self-contained offline HTML report: plotly.js inlined once, no CDN, no network.

A manifold viewer (one 3-D plot and a dropdown that switches between the chosen latents' manifolds, like the
paper's online demo), then one section per registered analysis (:mod:`bilae.analysis.analyses`, in registry
order). ``build_report`` arranges the results of :func:`~bilae.analysis.registry.run_analyses`;
``render_report`` turns them into one HTML string; ``write_report`` writes it atomically.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio
import plotly.offline

from bilae.analysis.registry import AnalysisResult, HtmlPanel
from bilae.analysis.session import AnalysisSession
from bilae.autoencoders.checkpoint import atomic_write_text

DIGITS = 4  # decimals kept for manifold coordinates: the viewer needs no more, and the report stays small


@dataclass
class Section:
    """One titled part of the report: figures and/or an HTML fragment (already escaped)."""

    title: str
    note: str = ""
    figures: list[go.Figure] = field(default_factory=list)
    html: str = ""


@dataclass
class Report:
    """Everything the HTML report shows."""

    title: str
    summary: dict[str, str]
    manifolds: dict[str, go.Figure]
    """Dropdown label → 3-D manifold figure."""
    sections: list[Section]
    viewer_note: str = ""


def build_report(
    session: AnalysisSession,
    latents: Sequence[int],
    results: Sequence[AnalysisResult],
    *,
    title: str = "bilae report",
    summary: dict[str, str] | None = None,
) -> Report:
    """The report of ``results`` (from :func:`~bilae.analysis.registry.run_analyses`), in registry order.

    Panels of viewer analyses (the manifolds) go into the dropdown, labelled by their figure titles; every other
    analysis is a section with its figures and HTML (tables go to W&B only); a skipped one says why.
    """
    config = session.coder.config
    info = {
        "autoencoder": str(config.name),
        "kind": session.kind,
        "d_model × expansion": f"{config.d_model} × {config.expansion} = {session.m} latents",
        "layer": str(config.layer),
        "sample": f"{session.n_tokens} tokens",
        "latents shown": ", ".join(map(str, latents)),
        **(summary or {}),
    }
    manifolds: dict[str, go.Figure] = {}
    sections, viewer_note = [], ""
    for result in results:
        analysis = result.analysis
        figures = [p for p in result.panels.values() if isinstance(p, go.Figure)]
        if analysis.viewer:
            manifolds |= {str(fig.layout.title.text or key): fig for key, fig in zip(result.panels, figures)}
            viewer_note = result.skipped or analysis.note
            continue
        fragment = "\n".join(p.html for p in result.panels.values() if isinstance(p, HtmlPanel))
        sections.append(Section(analysis.title, result.skipped or analysis.note, figures, fragment))
    return Report(title, info, manifolds, sections, viewer_note)


# ------------------------------------------------------------------------------------------------ render
def render_report(report: Report) -> str:
    """The whole report as one HTML document (plotly.js inlined once)."""
    parts = [_head(report.title), f"<h1>{html.escape(report.title)}</h1>", _summary(report.summary)]
    parts.append(_viewer(report.manifolds, report.viewer_note))
    for number, section in enumerate(report.sections):
        parts.append(_section(section, number))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(path: str | Path, report: Report) -> Path:
    """Render ``report`` and write it atomically to ``path``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, render_report(report))
    return path


STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1100px; color: #222; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.6em; }
table.summary td { padding: 2px 12px 2px 0; } .note { color: #666; }
.viewer select { font-size: 1em; } #manifold-plot { height: 620px; }
.figure { height: 380px; } .contexts > div { margin: 2px 0; }
"""

VIEWER_JS = r"""
(function () {
  var views = JSON.parse(document.getElementById('manifold-data').textContent);
  var gd = document.getElementById('manifold-plot');
  var select = document.getElementById('manifold-select');
  var status = document.getElementById('manifold-status');
  function plain(text) { return new DOMParser().parseFromString(text, 'text/html').documentElement.textContent; }
  function show(i) {
    var view = views[i];
    return Plotly.react(gd, view.data, view.layout, {responsive: true}).then(function () {
      var trace = gd.data[0], hover = trace.hovertext && trace.hovertext.length ? plain(trace.hovertext[0]) : '';
      status.textContent = select.options[i].text + ': ' + trace.x.length + ' tokens; strongest: ' + hover;
      status.dataset.rendered = String(i);
      status.dataset.canvases = String(gd.querySelectorAll('canvas').length);
    }).catch(function (err) { status.textContent = 'could not draw the manifold: ' + err; });
  }
  select.addEventListener('change', function () {
    try { history.replaceState(null, '', '#manifold=' + select.value); } catch (err) { /* file:// in some browsers */ }
    show(Number(select.value));
  });
  // report.html#manifold=2 opens the third manifold (links to one view can be shared).
  var asked = /manifold=(\d+)/.exec(location.hash), first = asked ? Math.min(Number(asked[1]), views.length - 1) : 0;
  if (views.length) { select.value = String(first); show(first); }
  else { status.textContent = 'no manifolds in this report'; }
})();
"""


def _head(title: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style>"
        f'<script type="text/javascript">{plotly.offline.get_plotlyjs()}</script></head><body>'
    )


def _summary(summary: dict[str, str]) -> str:
    rows = "".join(
        f"<tr><td><b>{html.escape(k)}</b></td><td>{html.escape(str(v))}</td></tr>" for k, v in summary.items()
    )
    return f'<table class="summary">{rows}</table>'


def _viewer(manifolds: dict[str, go.Figure], note: str) -> str:
    options = "".join(
        f'<option value="{i}">{html.escape(label)}</option>' for i, label in enumerate(manifolds)
    )
    views = [json.loads(pio.to_json(_compact(fig), validate=False)) for fig in manifolds.values()]
    data = _script_json(views)
    return (
        '<section class="viewer" id="manifolds"><h2>Manifolds</h2>'
        f'<p class="note">{html.escape(note)}</p>'
        f'<label>Manifold: <select id="manifold-select">{options}</select></label>'
        '<div id="manifold-plot"></div><p id="manifold-status" class="note">drawing…</p>'
        f'<script type="application/json" id="manifold-data">{data}</script>'
        f"<script>{VIEWER_JS}</script></section>"
    )


def _section(section: Section, number: int) -> str:
    parts = [f"<section><h2>{html.escape(section.title)}</h2>"]
    if section.note:
        parts.append(f'<p class="note">{html.escape(section.note)}</p>')
    for j, fig in enumerate(section.figures):
        parts.append(
            pio.to_html(
                fig,
                include_plotlyjs=False,
                full_html=False,
                div_id=f"figure-{number}-{j}",
                default_height="380px",
                config={"responsive": True},
            )
        )
    if section.html:
        parts.append(f'<div class="contexts">{section.html}</div>')
    parts.append("</section>")
    return "\n".join(parts)


def _compact(fig: go.Figure) -> go.Figure:
    """Round 3-D coordinates and colours so that thousands of points cost little space."""
    for trace in fig.data:
        for axis in ("x", "y", "z"):
            values = getattr(trace, axis, None)
            if values is not None:
                trace[axis] = [round(float(v), DIGITS) for v in values]
        color = getattr(getattr(trace, "marker", None), "color", None)
        if color is not None and not isinstance(color, str):
            trace.marker.color = [round(float(v), DIGITS + 2) for v in color]
    return fig


def _script_json(value: object) -> str:
    """JSON safe inside a ``<script>`` element (no ``</script>`` or ``<!--`` can close it early)."""
    return json.dumps(value, ensure_ascii=False).replace("<", "\\u003c").replace(">", "\\u003e")
