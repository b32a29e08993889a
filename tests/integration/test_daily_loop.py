"""The researcher's daily loop on the real CLI (tiny Qwen3, CPU, W&B offline): a sweep and its summary, a killed run
resumed from its checkpoint alone, and a console that shows steps and none of the libraries' noise."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

from bilae import Autoencoder
from bilae.builders import build
from tests.support.configs import TINY, cli, cli_env, train_cfg
from tests.support.wandb_records import config, run_record, summary

#: What a default run printed before (issue 10); none of it may come back.
NOISE = (
    "was called without a model",
    'ckpt_path="last") is set, but there is no last checkpoint',
    "Using ModelCheckpoint with manual optimization",
    "LeafSpec",
    "litlogger",
    "anonymous setting",
    "Epoch ",
    "There is a wandb run already in progress",
    "Checkpoint directory",
)
WANDB = ["logger=wandb", "trainer.enable_progress_bar=true"]


def bilae(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        cli(module, *args), cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=900
    )
    return done


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("wandb/offline-run-*"))


def assert_quiet(stderr: str) -> None:
    for noise in NOISE:
        assert noise not in stderr, f"{noise!r} on stderr:\n{stderr[-3000:]}"


@pytest.mark.slow
def test_a_sweep_gives_every_job_its_own_wandb_run_and_bilae_sweep_summarises_it(tmp_path: Path) -> None:
    sweep = tmp_path / "multirun" / "2026-01-31" / "12-00-00"
    done = bilae(
        "bilae.train", "-m", *TINY, *WANDB, "steps=4", "trainer.val_check_interval=4", "autoencoder.alpha=0,0.2",
        f"hydra.sweep.dir={sweep}", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert_quiet(done.stderr)
    assert len(re.findall(r"step 4/4", done.stdout)) == 2, done.stdout[-2000:]  # each job's bar counts steps

    ids = set()
    for job, alpha in ((0, 0.0), (1, 0.2)):
        (run,) = offline_runs(sweep / str(job))
        record = run_record(run)
        ids.add(record.run_id)
        assert record.run_group == "2026-01-31/12-00-00"
        assert record.display_name == f"2026-01-31/12-00-00/{job} autoencoder.alpha={alpha:g}"
        assert config(run)["autoencoder"]["alpha"] == alpha  # the job's own resolved config
        metrics = json.loads((sweep / str(job) / "metrics.json").read_text())
        assert summary(run)["val/mse"] == pytest.approx(metrics["val/mse"])  # and its own final metrics
        assert f"W&B run:        {run}/files" in done.stdout  # every job prints its own paths
        assert json.loads((sweep / str(job) / "wandb-run.json").read_text())["id"] == record.run_id
    assert len(ids) == 2

    summarised = bilae("bilae.sweep", str(sweep), cwd=tmp_path)
    assert summarised.returncode == 0, summarised.stderr[-3000:]
    table = (sweep / "sweep.md").read_text()
    assert "| 0 | alpha=0 |" in table and "| 1 | alpha=0.2 |" in table
    assert (sweep / "sweep.csv").read_text().count("\n") == 3
    page = (sweep / "sweep.html").read_text()
    assert '"text":["alpha=0","alpha=0.2"]' in page  # the Pareto points, labelled by the swept values
    (summary_run,) = offline_runs(sweep)
    assert run_record(summary_run).run_group == "2026-01-31/12-00-00"


# ------------------------------------------------------------------------------------------------- resume
STEPS = 12
RESUMABLE = [*TINY, *WANDB, f"steps={STEPS}", "trainer.val_check_interval=100",
             "callbacks.checkpoint.every_n_train_steps=1"]  # fmt: skip
KILL = ["+callbacks.fault._target_=tests.support.faults.KillAt", "+callbacks.fault.step=5",
        "+callbacks.fault.on_resume=false"]  # fmt: skip


def same_weights_as_an_uninterrupted_run(run: Path, tmp_path: Path) -> None:
    reference = train_cfg(tmp_path / "reference", *RESUMABLE[len(TINY) :], "logger=none",
                          "trainer.enable_progress_bar=false")  # fmt: skip
    module, datamodule, trainer = build(reference)
    trainer.fit(module, datamodule=datamodule)
    (folder,) = (run / "autoencoder").iterdir()
    final = Autoencoder.load(folder)
    for name, tensor in module.coder.state_dict().items():
        torch.testing.assert_close(final.state_dict()[name], tensor, rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_checkpoint_alone(tmp_path: Path) -> None:
    run = tmp_path / "run"
    # TINY has callbacks=none: checkpoints are written all the same, so the run can be resumed.
    killed = bilae("bilae.train", *RESUMABLE, *KILL, f"hydra.run.dir={run}", cwd=tmp_path)
    assert killed.returncode == -9, killed.stderr[-3000:]
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 4
    (first,) = offline_runs(run)
    before = (run / ".hydra" / "config.yaml").read_bytes()

    # An override that changes the model's shape is refused in one line, before anything is written.
    refused = bilae("bilae.train", f"ckpt_path={last}", "autoencoder.expansion=4", cwd=tmp_path)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    (line,) = refused.stderr.strip().splitlines()
    assert line.startswith("bilae-train: error: cannot resume") and "autoencoder.expansion=4" in line
    assert "trained with autoencoder.expansion=2" in line
    assert (run / ".hydra" / "config.yaml").read_bytes() == before and len(offline_runs(run)) == 1

    # The checkpoint alone: the run's own configuration, directory and W&B run.
    resumed = bilae("bilae.train", f"ckpt_path={last}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_quiet(resumed.stderr)
    assert f"step {STEPS}/{STEPS}" in resumed.stdout and f"run directory:  {run}" in resumed.stdout
    assert not (tmp_path / "outputs").exists(), "the resume wrote a new run directory"
    assert json.loads((run / "metrics.json").read_text())["steps"] == STEPS
    # The resumed attempt trained, so its record (with the checkpoint) is now the run's.
    assert f"ckpt_path={last}" in (run / ".hydra" / "overrides.yaml").read_text()
    # The killed run's log may end before its first records (SIGKILL): its directory name carries its id.
    stored = json.loads((run / "wandb-run.json").read_text())["id"]
    assert first.name.endswith(f"-{stored}")
    (second,) = set(offline_runs(run)) - {first}
    assert run_record(second).run_id == stored and second.name.endswith(f"-{stored}")
    same_weights_as_an_uninterrupted_run(run, tmp_path)
