"""The analysis callback on a real tiny run (Qwen3-tiny, CPU): W&B offline media, report, skips and timing."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from bilae import UsageError
from bilae import callbacks as C
from bilae.analysis.registry import HtmlPanel
from bilae.analysis.session import next_token_predictor
from bilae.builders import build
from tests.support.configs import train_cfg

RUN = [
    "data.max_sequences=100",
    "trainer.val_check_interval=4",
    "buffer_tokens=0",
    "steps=4",
    "export=false",
    "callbacks=default",
    "callbacks.checkpoint.every_n_train_steps=4",
]
MEDIA = ("ged", "overlap", "spectrum", "atlas", "manifold")


def fit(cfg):
    module, datamodule, trainer = build(cfg)
    trainer.fit(module, datamodule=datamodule)
    return module, trainer


def analysis_callback(trainer) -> C.AnalysisCallback:
    (callback,) = [c for c in trainer.callbacks if isinstance(c, C.AnalysisCallback)]
    return callback


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory: pytest.TempPathFactory):
    """A 4-step mixed run logging to W&B offline; the analyses also run every 2 steps."""
    out = tmp_path_factory.mktemp("run")
    cfg = train_cfg(
        out, *RUN, "logger=wandb", "callbacks.analysis.every_n_steps=2", "analysis.options.manifold.points=50"
    )
    module, trainer = fit(cfg)
    import wandb

    wandb.finish()
    return out, module, trainer


@pytest.mark.slow
def test_callback_logs_plotly_media_to_the_offline_wandb_run(wandb_run) -> None:
    out, _, trainer = wandb_run
    runs = list(out.glob("wandb/offline-run-*/files/media"))
    assert len(runs) == 1, runs
    media = runs[0]
    for name in MEDIA:
        files = list((media / "plotly" / "analysis").glob(f"{name}*")) + list(
            (media / "plotly" / "analysis" / name).glob("*.plotly.json")
        )
        assert files, f"no plotly media for {name}"
    assert len(list((media / "plotly" / "analysis").glob("ged_*.plotly.json"))) == 2, (
        "steps 2 and 4, once each"
    )
    latents = sorted(
        int(p.name.split("_")[0]) for p in (media / "plotly" / "analysis" / "manifold").iterdir()
    )
    assert len(latents) == 2 * 4, "4 latents at steps 2 and 4"
    html = list((media / "html" / "analysis").glob("examples_*.html"))
    assert len(html) == 2 and "latent" in html[0].read_text()
    assert list((media / "table" / "analysis").glob("examples_table_*.table.json"))
    # Hover texts carry the model's prediction (Qwen3 has an LM head): "…context [token] → prediction".
    figure = json.loads(next((media / "plotly" / "analysis" / "manifold").iterdir()).read_text())
    hover = figure["data"][0]["hovertext"]
    assert len(hover) == 50 and all("[" in h and " → " in h for h in hover)
    callback = analysis_callback(trainer)
    (results,) = callback.results.values()
    assert [r.analysis.name for r in results] == [
        "manifold",
        "ged",
        "overlap",
        "spectrum",
        "atlas",
        "examples",
    ]
    assert all(r.skipped is None and r.seconds > 0 for r in results)


@pytest.mark.slow
def test_fit_end_writes_the_report(wandb_run) -> None:
    out, module, trainer = wandb_run
    report = out / "report.html"
    assert report.is_file()
    text = report.read_text(encoding="utf-8")
    assert module.coder.config.name in text and 'id="manifold-select"' in text
    manifolds = [k for k in analysis_callback(trainer).panels if k.startswith("analysis/manifold/")]
    assert len(manifolds) == 4
    assert all(f"latent {k.rsplit('/', 1)[1]} " in text for k in manifolds)


@pytest.mark.slow
def test_kinds_without_bottleneck_skip_overlaps_with_one_line(tmp_path: Path, caplog) -> None:
    cfg = train_cfg(
        tmp_path, *RUN, "autoencoder=vanilla", "autoencoder.bottleneck=null", "logger=csv",
        "analysis.options.manifold.points=20", "analysis.features=[3,5]",
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="bilae"):
        module, trainer = fit(cfg)
    messages = [r.getMessage() for r in caplog.records]
    skipped = [m for m in messages if "skipped" in m]
    assert len(skipped) == 3 and all("'vanilla' autoencoder has no bottleneck" in m for m in skipped), skipped
    panels = analysis_callback(trainer).panels
    assert not [k for k in panels if k.split("/")[1] in ("ged", "overlap", "atlas")]
    # Given latents are used for every analysis.
    assert sorted(k for k in panels if k.startswith("analysis/spectrum")) == [
        "analysis/spectrum/3",
        "analysis/spectrum/5",
    ]
    assert sorted(k for k in panels if k.startswith("analysis/manifold")) == [
        "analysis/manifold/3",
        "analysis/manifold/5",
    ]
    text = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert text.count("skipped: a &#x27;vanilla&#x27; autoencoder has no bottleneck") == 3
    # Timings go to non-W&B loggers too; figures do not.
    metrics = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    assert "analysis/time/manifold" in metrics and "analysis/time/sample" in metrics


@pytest.mark.slow
def test_a_bad_latent_index_is_one_warning_and_training_goes_on(tmp_path: Path, caplog) -> None:
    cfg = train_cfg(tmp_path, *RUN, "analysis.features=[999]", "analysis.run=[spectrum]")
    with caplog.at_level(logging.INFO, logger="bilae"):
        module, trainer = fit(cfg)
    messages = [r.getMessage() for r in caplog.records]
    assert any("feature index 999 is out of range; valid: 0 to 127" in m for m in messages), messages
    assert trainer.global_step == 4 and analysis_callback(trainer).panels == {}


def test_every_n_steps_must_be_positive() -> None:
    with pytest.raises(UsageError, match="every_n_steps must be a positive"):
        C.AnalysisCallback(every_n_steps=0)


def test_unknown_analysis_or_option_is_refused_when_the_callback_is_built() -> None:
    callback = C.AnalysisCallback({"run": ["pca"]})
    with pytest.raises(UsageError, match=r"unknown analysis 'pca'; valid: .*'manifold'"):
        from bilae.analysis.registry import selected

        selected(callback.settings)
    with pytest.raises(UsageError, match=r"n_features must be positive"):
        C.AnalysisCallback({"n_features": 0})


def test_log_panels_sends_media_only_to_wandb() -> None:
    class Csv:
        logged: list = []

        def log_metrics(self, metrics, step):
            self.logged.append((metrics, step))

    class WandbLogger:  # matched by class name, like Lightning's
        class experiment:
            logged: list = []

            @classmethod
            def log(cls, payload):
                cls.logged.append(payload)

    csv, wb = Csv(), WandbLogger()
    C.log_panels([csv, wb], {"analysis/examples": HtmlPanel("<b>x</b>")}, {"analysis/time/x": 1.5}, step=7)
    assert csv.logged == [({"analysis/time/x": 1.5}, 7)]
    payload = wb.experiment.logged[0]
    assert payload["trainer/global_step"] == 7 and payload["analysis/time/x"] == 1.5
    assert type(payload["analysis/examples"]).__name__ == "Html"


def test_next_token_predictor_runs_the_full_model(qwen3_tiny, minilm) -> None:
    model, _ = qwen3_tiny
    predict = next_token_predictor(model)
    ids = torch.randint(0, 1000, (2, 6))
    mask = torch.ones_like(ids)
    expected = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
    assert predict is not None and torch.equal(predict(ids, mask), expected)
    assert next_token_predictor(minilm[0]) is None, "MiniLM (BERT) has no LM head: no predictions"
