"""``bilae-analyze``: end to end on a tiny checkpoint, and one clear error (exit code 2) per mistake."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import wandb

from bilae import Autoencoder
from bilae import analyze as A
from bilae.errors import CheckpointError, DataError, UsageError
from tests.support.configs import TINY_ANALYZE, analyze_cfg


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Untrained tiny autoencoders for Qwen3-tiny (d=64) at layer 1 (the model config's default is 2)."""
    root = tmp_path_factory.mktemp("checkpoints")
    Autoencoder.from_config("mixed", d_model=64, layer=1, expansion=2, bottleneck=1).save(root / "mixed-l01")
    Autoencoder.from_config("vanilla", d_model=64, layer=1, expansion=2).save(root / "vanilla-l01")
    Autoencoder.from_config("mixed", d_model=32, layer=1, expansion=2, bottleneck=1).save(root / "narrow")
    return root


@pytest.mark.slow
def test_analyze_in_process_takes_the_layer_from_the_checkpoint(checkpoints: Path, tmp_path: Path) -> None:
    cfg = analyze_cfg(
        tmp_path, f"checkpoint={checkpoints}", "name=mixed-l01", "analysis.features=[4,9]", "feature=2"
    )
    assert cfg.model.layer is None
    report = A.run(cfg)
    assert cfg.model.layer == 1
    text = report.read_text(encoding="utf-8")
    assert report == tmp_path / "report.html" and "latents shown" in text
    assert [f"latent {i} " in text for i in (2, 4, 9)] == [True] * 3
    assert "qwen3-tiny (layer 1)" in text and " → " in text


def cli(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    """Run the console script ``bilae-analyze`` in this process (Hydra parses ``args``); returns its exit code."""
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["bilae-analyze", *args])
    try:
        A.main()
    except SystemExit as exit:
        return int(exit.code or 0)
    finally:
        wandb.finish()
    return 0


@pytest.mark.slow
def test_bilae_analyze_cli_logs_to_wandb_offline(
    checkpoints: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    code = cli(
        monkeypatch, *TINY_ANALYZE, f"checkpoint={checkpoints}/vanilla-l01", f"hydra.run.dir={tmp_path}"
    )
    out = capsys.readouterr().out
    assert code == 0
    assert f"report:         {tmp_path / 'report.html'}" in out and "W&B run:" in out
    media = list(tmp_path.glob("wandb/offline-run-*/files/media"))
    assert len(media) == 1
    plotly = {
        p.relative_to(media[0] / "plotly" / "analysis").parts[0] for p in media[0].rglob("*.plotly.json")
    }
    assert plotly == {"spectrum", "manifold"}, "a vanilla coder has no GED, overlaps or atlas"
    assert list(media[0].glob("html/analysis/examples_*.html"))


def test_cli_error_is_one_line_with_exit_code_2(tmp_path: Path, monkeypatch, capsys) -> None:
    code = cli(monkeypatch, f"checkpoint={tmp_path}/missing", f"hydra.run.dir={tmp_path}", "logger=none")
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("bilae-analyze: error:")]
    assert len(errors) == 1 and "does not exist" in errors[0], err


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (["feature=500"], UsageError, r"feature index 500 is out of range; valid: 0 to 127"),
        (["analysis.features=[1,-1]"], UsageError, r"feature index -1 is out of range"),
        (
            ["name=vanilla-l01", "analysis.run=[spectrum,overlap]"],
            UsageError,
            r"'vanilla'.*'mixed' or 'combined'",
        ),
        (["analysis.run=[pca]"], UsageError, r"unknown analysis 'pca'; valid: .*'manifold'"),
        (["+analysis.options.atlas.colums=3"], UsageError, r"unknown option 'colums' of analysis 'atlas'"),
        (["name=nothing-here"], CheckpointError, r"no checkpoint named 'nothing-here'.*mixed-l01"),
    ],
)
def test_mistakes_before_loading_the_model(
    checkpoints: Path, tmp_path: Path, overrides, error, message
) -> None:
    name = [] if any(o.startswith("name=") for o in overrides) else ["name=mixed-l01"]
    cfg = analyze_cfg(tmp_path, f"checkpoint={checkpoints}", *name, *overrides)
    with pytest.raises(error, match=message):
        A.run(cfg)


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"give checkpoint="):
        A.run(analyze_cfg(tmp_path))
    with pytest.raises(CheckpointError, match=r"holds no config.json"):
        A.run(analyze_cfg(tmp_path, f"checkpoint={tmp_path}"))


@pytest.mark.slow
def test_checkpoint_must_fit_the_model_and_the_sample_must_not_be_empty(
    checkpoints: Path, tmp_path: Path
) -> None:
    with pytest.raises(CheckpointError, match=r"d_model 32, but model .* has d_model 64"):
        A.run(analyze_cfg(tmp_path, f"checkpoint={checkpoints}/narrow"))
    with pytest.raises(CheckpointError, match=r"trained at layer 1.*hooked at layer 3"):
        A.run(analyze_cfg(tmp_path, f"checkpoint={checkpoints}/mixed-l01", "model.layer=3"))
    with pytest.raises(DataError, match=r"analysis sample is empty"):
        A.run(analyze_cfg(tmp_path, f"checkpoint={checkpoints}/mixed-l01", "analysis.sample_sequences=0"))


@pytest.mark.slow
def test_manifolds_tutorial_runs_on_a_tiny_checkpoint(tmp_path: Path, monkeypatch, capsys) -> None:
    import runpy

    folder = tmp_path / "coder"
    Autoencoder.from_config("mixed", d_model=64, layer=2, expansion=2, bottleneck=1).save(folder)
    monkeypatch.setenv("BILAE_CHECKPOINT", str(folder))
    monkeypatch.setenv("BILAE_MODEL", "qwen3-tiny")
    monkeypatch.setenv("BILAE_TUTORIAL_OUT", str(tmp_path / "figures"))
    monkeypatch.setattr(sys, "argv", ["manifolds.py"])
    runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "manifolds.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "top GED:" in out and "latent" in out
    for name in ("ged", "overlap", "spectrum", "manifold"):
        assert (tmp_path / "figures" / f"{name}.html").stat().st_size > 1000, name
    assert (tmp_path / "figures" / "plotly.min.js").is_file()
    assert "hovertext" in (tmp_path / "figures" / "manifold.html").read_text()
