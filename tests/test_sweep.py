"""bilae-sweep: the table and the labelled Pareto page of a sweep directory (bilae/sweep.py, bilae/analysis/sweep.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from bilae import sweep as S
from bilae.analysis.figures import pareto_figure
from bilae.analysis.sweep import labels, load_sweep, per_coder, sweep_table, to_csv, to_markdown

COMMON = ["model=qwen3-tiny", "steps=4"]


def job(root: Path, number: int, overrides: list[str], metrics: dict) -> None:
    """A job directory as bilae-train -m leaves it: metrics.json and Hydra's record of the overrides."""
    folder = root / str(number)
    (folder / ".hydra").mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    OmegaConf.save(OmegaConf.create(overrides), folder / ".hydra" / "overrides.yaml")


def metrics(alpha: float, mse: float, density: float) -> dict:
    return {
        "kind": "mixed",
        "alpha": alpha,
        "val/mse": mse,
        "val/density": density,
        "train/mse": mse,
        "steps": 4.0,
    }


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "multirun" / "2026-01-31" / "12-00-00"
    for number, (alpha, mse, density) in enumerate([(0, 0.2, 0.5), (0.1, 0.3, 0.3), (0.2, 0.45, 0.2)]):
        job(root, number, [*COMMON, f"autoencoder.alpha={alpha}"], metrics(alpha, mse, density))
    return root


def test_rows_are_labelled_by_the_swept_values_only(sweep: Path) -> None:
    rows = per_coder(load_sweep(sweep))
    assert labels(rows) == ["alpha=0", "alpha=0.1", "alpha=0.2"]
    columns, values = sweep_table(rows)
    assert columns == ["job", "swept", "val/mse", "val/density", "train/mse", "steps", "overrides"]
    assert values[1][:4] == ["1", "alpha=0.1", 0.3, 0.3] and values[1][-1] == [
        *COMMON,
        "autoencoder.alpha=0.1",
    ]
    markdown = to_markdown(columns, values)
    assert "| 2 | alpha=0.2 | 0.45 | 0.2 | 0.45 | 4 | autoencoder.alpha=0.2 |" in markdown
    assert "Every job: `model=qwen3-tiny steps=4`" in markdown
    assert (
        to_csv(columns, values).splitlines()[1]
        == "0,alpha=0,0.2,0.5,0.2,4,model=qwen3-tiny steps=4 autoencoder.alpha=0"
    )


def test_a_job_with_several_coders_is_one_row_per_coder(tmp_path: Path) -> None:
    both = {"coders": {n: {"val/mse": m, "val/density": d, "kind": "mixed"} for n, m, d in
                       [("mixed-l02-x2-a0-b0", 0.2, 0.5), ("mixed-l02-x2-a20-b0", 0.4, 0.2)]},
            "val/mse": 0.3, "steps": 4.0}  # fmt: skip
    job(tmp_path, 0, ["autoencoder.alpha=[0,0.2]"], both)
    rows = per_coder(load_sweep(tmp_path))
    assert [r["coder"] for r in rows] == ["mixed-l02-x2-a0-b0", "mixed-l02-x2-a20-b0"]
    assert [r["val/mse"] for r in rows] == [0.2, 0.4] and labels(rows)[1] == "mixed-l02-x2-a20-b0"


def test_the_pareto_points_carry_their_labels(sweep: Path) -> None:
    rows = per_coder(load_sweep(sweep))
    figure = pareto_figure(rows, labels=labels(rows))
    points = figure.data[0]
    assert list(points.text) == ["alpha=0", "alpha=0.1", "alpha=0.2"] and points.mode == "markers+text"
    assert list(points.y) == [0.2, 0.3, 0.45] and list(points.x) == [0.5, 0.3, 0.2]


def test_bilae_sweep_writes_the_table_and_a_self_contained_page(sweep: Path, capsys) -> None:
    S.main([str(sweep), "--wandb", "off"])
    out = capsys.readouterr().out
    assert "| 1 | alpha=0.1 |" in out and f"html:     {sweep / 'sweep.html'}" in out
    page = (sweep / "sweep.html").read_text()
    assert "alpha=0.2" in page and "<table" in page
    assert "<script src=" not in page and len(page) > 1_000_000  # plotly.js inlined: opens offline
    assert (sweep / "sweep.csv").read_text().startswith("job,swept,val/mse")
    assert not (sweep / "wandb").exists()


def test_bilae_sweep_logs_to_the_sweeps_wandb_group_when_the_jobs_did(sweep: Path) -> None:
    (sweep / "0" / "wandb-run.json").write_text(
        json.dumps({"id": "a", "group": "2026-01-31/12-00-00", "project": "p"})
    )
    written = S.summarise(sweep, sweep, "density", "mse")
    assert written["wandb"].parent == sweep / "wandb" and written["wandb"].name.startswith("offline-run-")
    # The group in the run's log is read back in tests/integration/test_daily_loop.py (after the process ends).
    assert list((written["wandb"] / "files" / "media" / "plotly" / "sweep").glob("pareto_*.plotly.json"))


def test_errors_are_one_line(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as stopped:
        S.main([str(tmp_path / "nope")])
    assert stopped.value.code == 2
    assert (
        capsys.readouterr().err.strip()
        == f"bilae-sweep: error: sweep directory {str(tmp_path / 'nope')!r} does not exist"
    )
    with pytest.raises(SystemExit):
        S.main([str(tmp_path)])
    assert "no readable metrics.json" in capsys.readouterr().err
