"""Figure builders return plotly figures carrying the data; the sweep loader and Pareto front."""

import json

import plotly.graph_objects as go
import pytest
import torch

from bilae import DataError, UsageError
from bilae.analysis import (
    atlas_figure,
    composite_atlas,
    ged_figure,
    load_sweep,
    manifold_figure,
    overlap_histogram,
    pareto_figure,
    sample_manifold,
    spectrum,
    spectrum_figure,
)
from bilae.analysis.sweep import lookup, pareto_front


def test_ged_histogram_and_spectrum():
    ged = torch.tensor([1.0, 3.0, 2.0])
    fig = ged_figure(ged)
    assert isinstance(fig, go.Figure) and list(fig.data[0].y) == [1.0, 3.0, 2.0]
    hist = overlap_histogram(torch.tensor([-0.5, 0.1, 1.0]))
    assert hist.layout.yaxis.type == "log" and tuple(hist.layout.xaxis.range) == (-1.1, 1.1)
    spec = spectrum(torch.diag(torch.tensor([0.5, -2.0, 1.0])))
    line = spectrum_figure(spec)
    assert list(line.data[0].y) == [-2.0, 1.0, 0.5]
    assert list(spectrum_figure(spec.eigenvalues, n=2).data[0].y) == [-2.0, 1.0]


def test_manifold_figure_is_diverging_and_escapes_hover():
    batch = (torch.randn(1, 6, 3), torch.ones(1, 6, dtype=torch.bool), torch.arange(6)[None])
    sample = sample_manifold([batch], torch.diag(torch.tensor([1.0, -1.0, 0.5])), k=6)
    fig = manifold_figure(sample, hover=[f"<t{i}>" for i in range(6)], k=4)
    (trace,) = fig.data
    assert trace.marker.cmid == 0 and trace.marker.colorscale is not None
    assert list(trace.marker.color) == pytest.approx(sample.values[:4].tolist())
    assert list(trace.x) == pytest.approx(sample.coords[:4, 0].tolist())
    assert trace.hovertext[0] == "&lt;t0&gt;"
    assert "λ=" in fig.layout.scene.xaxis.title.text


def test_atlas_figure():
    left, right, down = torch.randn(12, 8), torch.randn(12, 8), torch.randn(3, 12)
    atlas = composite_atlas((left, right, down), tol=0.0)
    fig = atlas_figure(atlas)
    assert list(fig.data[0].x) == pytest.approx(atlas.rank.tolist())
    assert list(fig.data[0].marker.color) == pytest.approx(atlas.captured.tolist())


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_load_sweep_and_pareto(tmp_path):
    write(tmp_path / "0" / "metrics.json", {"kind": "mixed", "val": {"mse": 0.3, "density": 0.1}})
    write(tmp_path / "1" / "metrics.json", {"kind": "mixed", "val/mse": 0.2, "val/density": 0.2})
    write(tmp_path / "2" / "metrics.json", {"kind": "mixed", "val/mse": 0.4, "val/density": 0.3})
    write(tmp_path / "3" / "metrics.json", {"config": {"kind": "vanilla"}, "mse": 0.5, "density": 0.05})
    (tmp_path / "4").mkdir()
    (tmp_path / "4" / "metrics.json").write_text("{broken")
    runs = load_sweep(tmp_path)
    assert len(runs) == 4 and runs[0]["val/mse"] == 0.3 and runs[0]["path"].endswith("0/metrics.json")
    assert lookup(runs[3], "kind") == "vanilla" and lookup(runs[0], "mse") == 0.3
    fig = pareto_figure(runs)
    names = [t.name for t in fig.data]
    assert names == ["mixed", "mixed front", "vanilla", "vanilla front"]
    assert list(fig.data[1].x) == [0.1, 0.2]  # (0.3, 0.4) is dominated
    assert pareto_front([(1, 1), (2, 0.5), (3, 0.7), (0.5, 2)]) == [(0.5, 2), (1, 1), (2, 0.5)]


def test_sweep_errors(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_sweep(tmp_path / "nope")
    with pytest.raises(DataError, match="no readable metrics.json"):
        load_sweep(tmp_path)
    (tmp_path / "metrics.json").write_text("nope")
    with pytest.raises(DataError, match="1 unreadable"):
        load_sweep(tmp_path)
    with pytest.raises(DataError, match="no run has both 'density' and 'mse'"):
        pareto_figure([{"kind": "mixed", "loss": 1.0}])
