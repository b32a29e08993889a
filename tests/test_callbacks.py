"""Analysis callbacks on a real tiny run (Qwen3-tiny, CPU): W&B offline media, report, skips and timing."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, open_dict

from bilae import UsageError
from bilae import callbacks as C
from bilae import train as T
from bilae.analysis.session import next_token_predictor
from bilae.config import compose

TINY = [
    "model=qwen3-tiny",
    "autoencoder.expansion=2",
    "autoencoder.bottleneck=1",
    "data.n_ctx=32",
    "data.batch_size=4",
    "data.val_sequences=8",
    "data.max_sequences=100",
    "trainer.enable_progress_bar=false",
    "trainer.val_check_interval=4",
    "buffer_tokens=0",
    "steps=4",
    "export=false",
    "callbacks.checkpoint.every_n_train_steps=4",
]
MEDIA = ("ged", "overlap", "spectrum", "atlas", "manifold")


def tiny_cfg(tmp_path: Path, *overrides: str) -> DictConfig:
    cfg = compose("train", [*TINY, f"paths.output_dir={tmp_path}", *overrides])
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def fit(cfg: DictConfig):
    module, datamodule, trainer = T.build(cfg)
    trainer.fit(module, datamodule=datamodule)
    return module, trainer


def callback(trainer, cls: type) -> C.AnalysisCallback:
    return next(c for c in trainer.callbacks if type(c) is cls)


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory: pytest.TempPathFactory):
    """A 4-step mixed run with every callback, logging to W&B offline; the GED callback also runs every 2 steps."""
    out = tmp_path_factory.mktemp("run")
    cfg = tiny_cfg(out, "logger=wandb", "callbacks.ged.every_n_steps=2", "callbacks.manifold.points=50")
    module, trainer = fit(cfg)
    import wandb

    wandb.finish()
    return out, module, trainer


@pytest.mark.slow
def test_callbacks_log_plotly_media_to_the_offline_wandb_run(wandb_run) -> None:
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
    assert len(latents) == 4
    html = list((media / "html" / "analysis").glob("examples_*.html"))
    assert len(html) == 1 and "latent" in html[0].read_text()
    assert list((media / "table" / "analysis").glob("examples_table_*.table.json"))
    # Hover texts carry the model's prediction (Qwen3 has an LM head): "…context [token] → prediction".
    figure = json.loads(next((media / "plotly" / "analysis" / "manifold").iterdir()).read_text())
    hover = figure["data"][0]["hovertext"]
    assert len(hover) == 50 and all("[" in h and " → " in h for h in hover)
    assert callback(trainer, C.ManifoldCallback).seconds > 0


@pytest.mark.slow
def test_fit_end_writes_the_report(wandb_run) -> None:
    out, module, trainer = wandb_run
    report = out / "report.html"
    assert report.is_file()
    text = report.read_text(encoding="utf-8")
    assert module.coder.config.name in text and 'id="manifold-select"' in text
    latents = callback(trainer, C.ManifoldCallback).panels
    assert all(f"latent {k.rsplit('/', 1)[1]} " in text for k in latents)


@pytest.mark.slow
def test_kinds_without_bottleneck_skip_overlaps_with_one_line(tmp_path: Path, caplog) -> None:
    cfg = tiny_cfg(
        tmp_path, "autoencoder=vanilla", "autoencoder.bottleneck=null", "logger=csv",
        "callbacks.manifold.points=20", "callbacks.spectrum.features=[3,5]", "callbacks.examples.features=[999]",
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="bilae"):
        module, trainer = fit(cfg)
    messages = [r.getMessage() for r in caplog.records]
    skipped = [m for m in messages if "skipped" in m]
    assert len(skipped) == 3 and all("'vanilla' autoencoder has no bottleneck" in m for m in skipped), skipped
    for cls in (C.EffectiveDimensionCallback, C.OverlapCallback, C.AtlasCallback):
        assert callback(trainer, cls).panels == {}
    # Given latents are used; otherwise the most active latents stand in for the top GED.
    assert sorted(callback(trainer, C.SpectrumCallback).panels) == [
        "analysis/spectrum/3",
        "analysis/spectrum/5",
    ]
    assert len(callback(trainer, C.ManifoldCallback).panels) == 4
    # A bad index is one warning; training and the other callbacks go on.
    assert any("feature index 999 is out of range; valid: 0 to 127" in m for m in messages)
    assert trainer.global_step == 4 and callback(trainer, C.ExamplesCallback).panels == {}
    text = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "skipped: a &#x27;vanilla&#x27; autoencoder has no bottleneck" in text
    # Timings go to non-W&B loggers too; figures do not.
    metrics = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    assert "analysis/time/manifold" in metrics and "analysis/time/sample" in metrics


def test_every_n_steps_must_be_positive() -> None:
    with pytest.raises(UsageError, match="every_n_steps must be a positive"):
        C.ManifoldCallback(every_n_steps=0)


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
    C.log_panels([csv, wb], {"analysis/examples": C.HtmlPanel("<b>x</b>")}, {"analysis/time/x": 1.5}, step=7)
    assert csv.logged == [({"analysis/time/x": 1.5}, 7)]
    payload = wb.experiment.logged[0]
    assert payload["trainer/global_step"] == 7 and payload["analysis/time/x"] == 1.5
    assert type(payload["analysis/examples"]).__name__ == "Html"


def test_next_token_predictor_runs_the_full_model(qwen3_tiny, minilm) -> None:  # noqa: F811
    model, _ = qwen3_tiny
    predict = next_token_predictor(model)
    ids = torch.randint(0, 1000, (2, 6))
    mask = torch.ones_like(ids)
    expected = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
    assert torch.equal(predict(ids, mask), expected)
    assert next_token_predictor(minilm[0]) is None, "MiniLM (BERT) has no LM head: no predictions"
