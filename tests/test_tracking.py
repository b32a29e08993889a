"""One W&B run per job: fresh ids, the stored id on resume, names from the sweep, a finished run (bilae/tracking.py).

What the offline run files hold (config, summary, ids) is read back from subprocess runs in
tests/integration/test_daily_loop.py: in-process, wandb-core may still be writing the log when ``finish`` returns.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from bilae import tracking as T
from bilae.builders import build_loggers
from tests.support.configs import train_cfg


def wandb_node(tmp_path: Path, **values: object):
    return OmegaConf.create({"_target_": "bilae.tracking.WandbLogger", "save_dir": str(tmp_path), **values})


def test_every_job_gets_a_fresh_run_unless_it_resumes(tmp_path: Path) -> None:
    fresh = train_cfg(tmp_path)
    first, second = (T.wandb_arguments(fresh, wandb_node(tmp_path))["id"] for _ in range(2))
    assert first != second and len(first) == 8 and first.isalnum()
    (tmp_path / T.RUN_FILE).write_text(
        json.dumps({"id": "abc12345", "name": "2026-01-31/12-00-00", "group": "g"})
    )
    assert T.wandb_arguments(fresh, wandb_node(tmp_path))["id"] != "abc12345"  # a new run in an old directory
    resumed = T.wandb_arguments(train_cfg(tmp_path, "ckpt_path=last"), wandb_node(tmp_path))
    assert (resumed["id"], resumed["name"], resumed["group"]) == ("abc12345", "2026-01-31/12-00-00", "g")
    # Values set in the logger's config win; the resolved config goes along.
    chosen = T.wandb_arguments(fresh, wandb_node(tmp_path, name="mine", id="myid0001"))
    assert (chosen["name"], chosen["id"]) == ("mine", "myid0001")
    assert chosen["config"]["steps"] == fresh.steps and chosen["config"]["paths"]["output_dir"] == str(
        tmp_path
    )


def test_a_sweep_job_is_named_by_its_swept_values(tmp_path: Path) -> None:
    sweep = tmp_path / "multirun" / "2026-01-31" / "12-00-00"
    sweep.mkdir(parents=True)
    task = ["model=qwen3-tiny", "autoencoder.alpha=0,0.2", "seed=range(0,2)", "steps=4"]
    OmegaConf.save(OmegaConf.create({"hydra": {"overrides": {"task": task}}}), sweep / "multirun.yaml")
    job = ["model=qwen3-tiny", "autoencoder.alpha=0.2", "seed=1", "steps=4"]
    assert T.swept_values(sweep, job) == "autoencoder.alpha=0.2 seed=1"
    assert T.swept_values(tmp_path / "nowhere", job) == ""
    assert (
        T.override_key("+callbacks.fault.step=5") == "callbacks.fault.step"
        and T.override_key("~a.b") == "a.b"
    )
    assert T.job_name_and_group() == (None, None)  # outside a Hydra job


def test_the_logger_stores_its_run_and_finishes_it_with_a_summary(tmp_path: Path, monkeypatch) -> None:
    (logger,) = build_loggers(train_cfg(tmp_path, "logger=wandb"))
    assert isinstance(logger, T.WandbLogger) and "anonymous" not in logger._wandb_init
    logger.log_metrics({"train/mse": 0.5}, step=1)
    stored = json.loads((tmp_path / T.RUN_FILE).read_text())
    assert stored["id"] == logger.experiment.id and stored["project"] == "bilae"
    run = logger.experiment
    assert run.config["steps"] == 150 and run.config["autoencoder"]["kind"] == "mixed"  # the resolved config
    at_finish: dict[str, object] = {}
    finish = run.finish
    monkeypatch.setattr(run, "finish", lambda **kw: (at_finish.update(run.summary), finish(**kw)))
    T.finish_runs([logger], {"val/mse": 0.25, "steps": 1.0})
    import wandb

    assert wandb.run is None  # the next job starts its own run
    assert at_finish["val/mse"] == 0.25 and at_finish["train/mse"] == 0.5  # the final metrics as its summary
    (folder,) = tmp_path.glob("wandb/offline-run-*")
    assert folder.name.endswith(f"-{stored['id']}")
    T.finish_runs([logger])  # finishing twice, or a logger that never started, is harmless
