"""The seed notebook's code, as written (scripts/seed_notebook.py), runs offline in a fresh working directory."""

from __future__ import annotations

import runpy
from pathlib import Path

import plotly.graph_objects as go
import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "seed_notebook.py"


@pytest.mark.slow
def test_seed_notebook_runs_as_written(tmp_path, monkeypatch, capsys):
    shown: list[go.Figure] = []
    monkeypatch.setattr(go.Figure, "show", lambda fig, *a, **k: shown.append(fig))  # no browser in CI
    monkeypatch.chdir(tmp_path)
    names = runpy.run_path(str(SCRIPT), run_name="__main__")
    assert (tmp_path / "weights" / "qwen3-tiny" / "mixed-l18-x16-a20-b0" / "config.json").is_file()
    coder, manifold = names["coder"], names["manifold"]
    assert coder.hooked is not None and coder.hooked.layer == 18
    assert [fig.layout.title.text for fig in shown][:1] == ["Number of active elements in the overlap matrix"]
    assert len(shown) == 2  # the GED scatter and the overlap histogram
    out = capsys.readouterr().out
    top50 = eval(out.splitlines()[0])  # the notebook prints the top-50 GED latents first
    assert len(top50) == 50 and all(0 <= i < coder.d_features for i in top50)
    assert all(f"latent {i}" in out for i in names["inds"].tolist())  # vis(inds.tolist(), k=3)
    rows = names["dataset"]
    n_real = int(sum(int(m.sum()) for m in rows["attention_mask"]))
    assert len(manifold.sample) == n_real  # every real token of the 16 rows
    assert isinstance(manifold.spectrum(), go.Figure)
    (trace,) = manifold(k=40_000).data
    assert len(trace.x) == n_real
    assert torch.allclose(names["density"], names["density"].T)


@pytest.fixture(autouse=True)
def _restore_grad():
    yield
    torch.set_grad_enabled(True)
