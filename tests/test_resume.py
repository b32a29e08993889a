"""Resuming from the checkpoint alone: the command line bilae-train rebuilds before Hydra runs (bilae/resume.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from bilae import CheckpointError, UsageError
from bilae.resume import adopt_resume_record, find_run, merge_overrides, quote, resume_arguments
from tests.support.configs import TINY, composed

RECORD = "hydra.output_subdir=.hydra/resume"  # a resume attempt's record, the run's own only once it trains


def fake_run(root: Path, overrides: list[str]) -> Path:
    """A run directory as bilae-train leaves it: Hydra's record of the config and overrides, a last checkpoint."""
    (root / ".hydra").mkdir(parents=True)
    OmegaConf.save(composed("train", overrides), root / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(overrides), root / ".hydra" / "overrides.yaml")
    (root / "checkpoints").mkdir()
    (root / "checkpoints" / "last.ckpt").write_bytes(b"a checkpoint")
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fake_run(tmp_path_factory.mktemp("runs") / "run", [*TINY, "steps=16"])


def test_the_checkpoint_alone_brings_back_the_runs_overrides_directory_and_checkpoint(run_dir: Path) -> None:
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    args = resume_arguments([f"ckpt_path={ckpt}"])
    assert args == [*TINY, "steps=16", f"ckpt_path={ckpt}", f"hydra.run.dir={run_dir}", RECORD]


def test_overrides_given_again_win_and_flags_stay(run_dir: Path) -> None:
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    args = resume_arguments(["--cfg", "job", "steps=32", f"ckpt_path={ckpt}", "hydra.job.chdir=false"])
    assert args[:2] == ["--cfg", "job"]
    assert "steps=16" not in args and args.count("steps=32") == 1
    assert args[-3:] == ["hydra.job.chdir=false", f"hydra.run.dir={run_dir}", RECORD]
    # An explicit run directory is the user's choice.
    args = resume_arguments([f"ckpt_path={ckpt}", "hydra.run.dir=/elsewhere"])
    assert "hydra.run.dir=/elsewhere" in args and f"hydra.run.dir={run_dir}" not in args


def test_a_run_directory_resumes_from_its_newest_checkpoint(run_dir: Path, tmp_path: Path) -> None:
    assert find_run(run_dir) == (run_dir / "checkpoints" / "last.ckpt", run_dir)
    run = fake_run(tmp_path / "stopped", TINY)
    interrupted = run / "checkpoints" / "interrupted.ckpt"
    interrupted.write_bytes(b"saved on SIGTERM")
    os.utime(run / "checkpoints" / "last.ckpt", (1, 1))  # older than the exception checkpoint
    assert find_run(run) == (interrupted, run)
    assert resume_arguments([f"ckpt_path={run}"])[-3:] == [
        f"ckpt_path={interrupted}",
        f"hydra.run.dir={run}",
        RECORD,
    ]


def test_a_shape_change_is_refused_with_the_key_and_both_values(run_dir: Path) -> None:
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    for override, key, old, new in [
        ("autoencoder.expansion=4", "autoencoder.expansion", "2", "4"),
        ("autoencoder=vanilla", "autoencoder.kind", "mixed", "vanilla"),
        ("model.layer=1", "model.layer", "2", "1"),
        ("autoencoder.alpha=[0,0.1]", "autoencoder.alpha", "0.1", "[0, 0.1]"),
    ]:
        with pytest.raises(UsageError) as caught:
            resume_arguments([f"ckpt_path={ckpt}", override])
        message = str(caught.value)
        assert "\n" not in message and str(run_dir) in message, message
        assert f"{key}={new}" in message and f"trained with {key}={old}" in message, message
    # Settings that leave the shape alone are fine (a longer run, another α).
    assert "autoencoder.alpha=0.3" in resume_arguments(
        [f"ckpt_path={ckpt}", "autoencoder.alpha=0.3", "steps=64"]
    )


def test_left_alone_without_a_run_to_resume(tmp_path: Path, run_dir: Path) -> None:
    for args in (
        ["steps=3"],
        ["ckpt_path=last"],
        ["ckpt_path=null"],
        ["-m", f"ckpt_path={run_dir}"],
        ["--help"],
    ):
        assert resume_arguments(args) == args
    loose = tmp_path / "copied.ckpt"  # a checkpoint outside any run directory: the overrides must be given
    loose.write_bytes(b"x")
    assert resume_arguments([f"ckpt_path={loose}", "steps=3"]) == [f"ckpt_path={loose}", "steps=3"]


def test_missing_paths_and_empty_runs_are_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"ckpt_path '/nope.ckpt' does not exist"):
        resume_arguments(["ckpt_path=/nope.ckpt"])
    with pytest.raises(CheckpointError, match="not a bilae-train run directory"):
        resume_arguments([f"ckpt_path={tmp_path}"])
    run = fake_run(tmp_path / "run", TINY)
    (run / "checkpoints" / "last.ckpt").unlink()
    with pytest.raises(CheckpointError, match="holds no checkpoints/last.ckpt"):
        resume_arguments([f"ckpt_path={run}"])


def test_merging_and_quoting() -> None:
    saved = ["model=qwen3-tiny", "steps=16", "+callbacks.fault.step=5", "~callbacks.analysis"]
    given = ["steps=32", "+callbacks.fault.step=7"]
    assert merge_overrides(saved, given) == [
        "model=qwen3-tiny",
        "~callbacks.analysis",
        "steps=32",
        "+callbacks.fault.step=7",
    ]
    assert quote("/tmp/run-1/x.ckpt") == "/tmp/run-1/x.ckpt"
    assert quote("/tmp/my run/x.ckpt") == "'/tmp/my run/x.ckpt'"


def test_a_resume_that_trains_becomes_the_runs_record(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "run", [*TINY, "steps=16"])
    (run / ".hydra" / "resume").mkdir()
    OmegaConf.save(OmegaConf.create([*TINY, "steps=32"]), run / ".hydra" / "resume" / "overrides.yaml")
    assert "steps=16" in resume_arguments(
        [f"ckpt_path={run}"]
    )  # an attempt that never trained changes nothing
    adopt_resume_record(run)  # what AdoptResumeRecord does when the resumed run starts training
    args = resume_arguments([f"ckpt_path={run}"])
    assert "steps=32" in args and "steps=16" not in args
