"""The one analysis registry: a test-only analysis appears in the callback's output, in bilae-analyze and in the
report, with its options and its declared needs respected."""

from __future__ import annotations

from pathlib import Path

import plotly.graph_objects as go
import pytest
import torch

from bilae import Autoencoder, UsageError
from bilae import analyze as A
from bilae.analysis import registry as R
from bilae.analysis.session import AnalysisSession
from bilae.builders import build
from bilae.callbacks import AnalysisCallback
from tests.support.configs import analyze_cfg, train_cfg


@pytest.fixture
def dummy(monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """A test-only registry: the real analyses plus ``dummy`` (one figure per latent, option ``scale``) and
    ``needs_head`` (declares it needs an LM head). Records what ``dummy`` was called with."""
    calls: dict[str, list] = {"dummy": []}
    registry = dict(R.ANALYSES)

    @R.register("dummy", title="Dummy section", note="a test-only analysis", registry=registry)
    def dummy_analysis(session: AnalysisSession, latents, scale: float = 1.0) -> R.Panels:
        calls["dummy"].append((list(latents), scale))
        fig = go.Figure(go.Bar(y=[scale * i for i in latents]), layout={"title": {"text": "dummy figure"}})
        return {"analysis/dummy": fig}

    @R.register("needs_head", title="Needs a head", needs_lm_head=True, registry=registry)
    def needs_head(session: AnalysisSession, latents) -> R.Panels:
        return {"analysis/needs_head": go.Figure()}

    monkeypatch.setattr(R, "ANALYSES", registry)
    return calls


def test_registering_twice_and_unknown_options_are_refused(dummy) -> None:
    with pytest.raises(UsageError, match="registered twice"):
        R.register("dummy", title="again", registry=R.ANALYSES)(lambda s, latents: {})
    with pytest.raises(UsageError, match=r"unknown option 'scal' of analysis 'dummy'; valid: 'scale'"):
        R.selected(R.AnalysisSettings(options={"dummy": {"scal": 2}}))
    assert R.ANALYSES["dummy"].options() == {"scale": 1.0}


def test_needs_are_checked_before_running() -> None:
    coder = Autoencoder.from_config("vanilla", d_model=8, layer=0, expansion=2)
    session = AnalysisSession(coder, [], None)
    results = R.run_analyses(session, [0, 1], R.AnalysisSettings())
    skipped = {r.analysis.name: r.skipped for r in results if r.skipped}
    assert set(skipped) == {"ged", "overlap", "atlas", "manifold", "examples"}
    assert "no bottleneck" in skipped["ged"] and "no activation sample" in skipped["manifold"]
    ran = [r for r in results if r.skipped is None]
    assert [r.analysis.name for r in ran] == ["spectrum"] and set(ran[0].panels) == {
        "analysis/spectrum/0",
        "analysis/spectrum/1",
    }
    with pytest.raises(
        UsageError, match=r"analysis 'ged' cannot run: a 'vanilla' autoencoder has no bottleneck"
    ):
        R.run_analyses(session, [0], R.AnalysisSettings(run=["ged"]), strict=True)


@pytest.mark.slow
def test_a_new_analysis_reaches_the_callback_bilae_analyze_and_the_report(dummy, tmp_path: Path) -> None:
    # The training callback (one fit) ...
    cfg = train_cfg(
        tmp_path / "run", "steps=2", "trainer.val_check_interval=2", "callbacks=default", "export=true",
        "+analysis.options.dummy.scale=3", "analysis.options.manifold.points=20", "analysis.features=[1,2]",
    )  # fmt: skip
    module, datamodule, trainer = build(cfg)
    trainer.fit(module, datamodule=datamodule)
    (callback,) = [c for c in trainer.callbacks if isinstance(c, AnalysisCallback)]
    assert "analysis/dummy" in callback.panels
    assert dummy["dummy"] == [([1, 2], 3)]
    (results,) = callback.results.values()
    head = next(r for r in results if r.analysis.name == "needs_head")
    assert head.skipped is None, "Qwen3-tiny has an LM head: its predictions are in the sample"
    text = (tmp_path / "run" / "report.html").read_text(encoding="utf-8")
    assert "<h2>Dummy section</h2>" in text and "a test-only analysis" in text and "dummy figure" in text

    # ... and bilae-analyze, which creates no Lightning callback, on the exported coder.
    folder = module.coder.save(tmp_path / "coder")
    report = A.run(analyze_cfg(tmp_path / "analyze", f"checkpoint={folder}", "analysis.run=[dummy,spectrum]"))
    text = report.read_text(encoding="utf-8")
    assert "<h2>Dummy section</h2>" in text and "<h2>Spectra</h2>" in text and "<h2>Overlaps</h2>" not in text
    assert dummy["dummy"][-1] == (dummy["dummy"][-1][0], 1.0) and len(dummy["dummy"]) == 2


def test_bilae_analyze_refuses_an_analysis_whose_needs_are_unmet(dummy, tmp_path: Path) -> None:
    torch.manual_seed(0)
    folder = tmp_path / "vanilla"
    Autoencoder.from_config("vanilla", d_model=64, layer=2, expansion=2).save(folder)
    with pytest.raises(UsageError, match=r"'ged' needs a bottleneck D.*'mixed' or 'combined'"):
        A.run(analyze_cfg(tmp_path, f"checkpoint={folder}", "analysis.run=[ged]"))
