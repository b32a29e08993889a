"""Reliability: one clear error line per bad input, safe checkpoint loading, SIGKILL/NaN survival (tiny Qwen3, CPU).

The bad-input table runs through the real console-script path (``bilae.train.main``: Hydra, bilae's error reporting,
``sys.exit``) in one subprocess (tests/support/crafted.py), so the imports are paid once; its last case ends that
process for real, checking the process exit status too.

Non-writable output directories: the tests run as root, for whom ``chmod 555`` blocks nothing, so they point the
run directory below a regular file (``ENOTDIR``), which fails for every user.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from bilae import Autoencoder
from bilae import train as T
from bilae.cli import as_bilae_error, ensure_writable, reported, safe_checkpoint
from bilae.errors import CheckpointError, TrainingError, UsageError
from tests.support.crafted import evil_checkpoint, garbage_file, split_cases, truncate
from tests.test_train import TINY, tiny_cfg

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
for _name in ("BILAE_DEBUG", "HYDRA_FULL_ERROR"):
    ENV.pop(_name, None)
# Until conf/hydra/default.yaml lists it: the Hydra callback that refuses an unwritable run directory up front.
CHECK_DIR = "++hydra.callbacks.check_output_dir._target_=bilae.cli.CheckOutputDir"
NO_CALLBACKS = [t for t in TINY if not t.startswith("callbacks=")]
# With manual optimisation, Lightning 2.6 defers ModelCheckpoint(every_n_train_steps) until the monitored val/mse
# has been logged once; these runs never validate, so they checkpoint every step without a monitor.
MONITOR_NONE = "callbacks.checkpoint.monitor=null"
HYDRA_OWN = {".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "train.log"}


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (or ``root`` itself) → sha256."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {
        str(p.relative_to(root) if p != root else p.name): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in files
    }


def sentinel_run_dir(run: Path) -> Path:
    """A run directory that already holds what an earlier run left: none of it may change."""
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"earlier checkpoint")
    (run / "metrics.json").write_text('{"val/mse": 0.5}\n')
    Autoencoder.from_config("mixed", d_model=64, layer=2, expansion=2, bottleneck=1).save(
        run / "autoencoder" / "old"
    )
    return run


def drive(cases: list[dict], tmp_path: Path, env: dict[str, str] | None = None) -> tuple[dict, dict, int]:
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps(cases))
    cmd = [sys.executable, "-m", "tests.support.crafted", str(spec)]
    done = subprocess.run(cmd, cwd=tmp_path, env=env or ENV, capture_output=True, text=True, timeout=600)
    return split_cases(done.stdout), split_cases(done.stderr), done.returncode


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.slow
def test_bad_inputs_give_one_line_and_an_exit_code(tmp_path: Path) -> None:
    d = tmp_path
    (d / "empty.txt").write_text("")
    (d / "short.txt").write_text("just a few words\n")
    garbage_file(d / "garbage.ckpt")
    marker = d / "PWNED"
    evil_checkpoint(d / "evil.ckpt", marker)
    Autoencoder.from_config("mixed", d_model=32, layer=2, expansion=2, bottleneck=1).save(d / "other-d-model")
    Autoencoder.from_config("mixed", d_model=64, layer=2, expansion=2, bottleneck=1).save(d / "truncated")
    truncate(d / "truncated" / "model.safetensors")
    (d / "a-file").write_text("not a directory\n")

    # name, overrides, exit code, words the message must contain
    table = [
        ("hydra-option", ["data=nope"], 1, ["data/nope"]),
        ("hydra-key", ["model.nolayer=3"], 1, ["model.nolayer"]),
        ("layer", ["model.layer=9"], 2, ["layer 9", "0..3"]),
        ("kind", ["autoencoder.kind=mixd"], 2, ["mixd", "mixed"]),
        ("model", ["model.name=gpt-17"], 2, ["gpt-17"]),
        ("source", ["data.source=wikipedia"], 2, ["wikipedia", "pydoc"]),
        ("missing-ckpt", ["ckpt_path=/nope.ckpt"], 2, ["/nope.ckpt", "does not exist"]),
        ("corrupt-ckpt", [f"ckpt_path={d}/garbage.ckpt"], 2, ["garbage.ckpt", "corrupt"]),
        ("evil-ckpt", [f"ckpt_path={d}/evil.ckpt"], 2, ["refusing", "pickled code", "system"]),
        ("truncated-init", [f"init_from={d}/truncated"], 2, ["model.safetensors", "truncated"]),
        ("d-model", [f"init_from={d}/other-d-model"], 2, ["d_model 32", "64"]),
        ("empty-corpus", ["data=files", f"data.source_kwargs.paths={d}/empty.txt"], 2, ["empty"]),
        ("short-corpus", ["data=files", f"data.source_kwargs.paths={d}/short.txt"], 2, ["sequences from 1"]),
        ("output-dir", [f"paths.output_dir={d}/a-file/out"], 2, ["a-file/out", "not writable"]),
        ("run-dir", [f"hydra.run.dir={d}/a-file/run"], 2, ["a-file/run", "not writable"]),
    ]
    cases, before = [], {}
    for name, overrides, _, _ in table:
        run = d / "runs" / name
        argv = [*TINY, "steps=2", CHECK_DIR, f"hydra.run.dir={run}", *overrides]
        if name in ("output-dir", "run-dir"):
            run = d / "a-file"
        else:
            sentinel_run_dir(run)
        before[name] = tree(run)
        cases.append({"name": name, "argv": argv})

    # TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 makes torch.load unpickle anything unless told weights_only=True:
    # bilae's check must hold even then.
    out, err, returncode = drive(cases, d, {**ENV, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    assert returncode == table[-1][2], err.get(table[-1][0])  # the last case ended the process for real
    for name, _, code, words in table:
        assert name in err, f"{name}: no result; driver stdout: {out}"
        got, stderr = err[name]
        assert got == code, f"{name}: exit {got}, expected {code}\n{stderr}"
        assert "Traceback" not in stderr, f"{name}:\n{stderr}"
        for word in words:
            assert word in stderr, f"{name}: {word!r} not in\n{stderr}"
        if code == 2:
            (line,) = [line for line in stderr.splitlines() if "error:" in line]
            assert line.startswith("bilae-train: error: "), line
        run = d / "a-file" if name in ("output-dir", "run-dir") else d / "runs" / name
        after = tree(run)
        assert {k: after.get(k) for k in before[name]} == before[name], f"{name} changed files"
        assert set(after) - set(before[name]) <= HYDRA_OWN, f"{name} left {set(after) - set(before[name])}"
    assert not marker.exists(), "the pickled payload ran"


@pytest.mark.slow
def test_nan_activations_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    argv = [
        *NO_CALLBACKS, "steps=8", "buffer_tokens=0", "trainer.val_check_interval=100", f"hydra.run.dir={run}",
        "callbacks=[checkpoint,on_exception]", "callbacks.checkpoint.every_n_train_steps=1", MONITOR_NONE,
        "+callbacks.poison._target_=tests.support.crafted.PoisonActivations", "+callbacks.poison.step=3",
    ]  # fmt: skip
    _, err, returncode = drive([{"name": "nan", "argv": argv}], tmp_path)
    code, stderr = err["nan"]
    assert code == returncode == 1, stderr
    assert "non-finite loss" in stderr and "step 3" in stderr and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1].startswith("bilae-train: error: non-finite loss")
    for name, step in (("last.ckpt", 3), ("interrupted.ckpt", 3)):
        ckpt = torch.load(run / "checkpoints" / name, map_location="cpu", weights_only=True)
        assert ckpt["global_step"] == step, name
        assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values() if t.is_floating_point()), (
            name
        )
    assert not (run / "metrics.json").exists() and not (run / "autoencoder").exists()


# -------------------------------------------------------------------------------------------- SIGKILL
def wait_for(condition, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(
                f"run ended ({proc.returncode}) before the kill: {proc.stderr.read()[-3000:]}"
            )
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.02)


def steps_written(ckpts: Path) -> list[int]:
    log = ckpts / "writes.log"
    return [int(s) for s in log.read_text().split()] if log.exists() else []


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_that_resumes_exactly(tmp_path: Path) -> None:
    common = [*NO_CALLBACKS, "steps=30", "trainer.val_check_interval=100", "callbacks=[checkpoint,on_exception]",
              "callbacks.checkpoint.every_n_train_steps=1", MONITOR_NONE]  # fmt: skip
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    slow = [
        "+callbacks.slow._target_=tests.support.crafted.SlowCheckpointWrites",
        f"+callbacks.slow.dirpath={ckpts}",
    ]
    cmd = [sys.executable, "-m", "bilae.train", *common, *slow, f"hydra.run.dir={run}"]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    wait_for(lambda: len(steps_written(ckpts)) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    assert "SIGTERM" in stderr and "ckpt_path" in stderr and "Traceback" not in stderr
    interrupted = torch.load(ckpts / "interrupted.ckpt", map_location="cpu", weights_only=True)
    assert 1 <= interrupted["global_step"] < 30

    resume = [*cmd, f"ckpt_path={ckpts / 'interrupted.ckpt'}"]
    done = subprocess.run(resume, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = tiny_cfg(tmp_path / "reference", *common[len(NO_CALLBACKS) :])
    module, datamodule, trainer = T.build(reference)
    trainer.fit(module, datamodule=datamodule)
    (folder,) = (run / "autoencoder").iterdir()
    final = Autoencoder.load(folder)
    for name, tensor in module.coder.state_dict().items():
        torch.testing.assert_close(final.state_dict()[name], tensor, rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("BILAE_TEST_SEED", time.time_ns() % 10_000)))
    common = [*NO_CALLBACKS, "steps=40", "trainer.val_check_interval=100", "callbacks=[checkpoint]",
              "callbacks.checkpoint.every_n_train_steps=1", MONITOR_NONE]  # fmt: skip
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    slow = [
        "+callbacks.slow._target_=tests.support.crafted.SlowCheckpointWrites",
        f"+callbacks.slow.dirpath={ckpts}",
    ]

    def launch(*extra: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "bilae.train", *common, *slow, f"hydra.run.dir={run}", *extra]
        return subprocess.Popen(
            cmd, cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )

    kills = ["random", "mid-write", "random"]
    resumed_from: list[int] = []
    for i, how in enumerate(kills):
        proc = launch() if i == 0 else launch("ckpt_path=last")
        start = len(steps_written(ckpts))
        wait_for(lambda start=start: len(steps_written(ckpts)) >= start + 2, proc)  # this run made progress
        if how == "mid-write":
            wait_for(lambda: any(ckpts.glob(".writing-*")), proc)
            time.sleep(rng.uniform(0.0, 0.3))  # a write takes 8 × 50 ms
        else:
            time.sleep(rng.uniform(0.0, 1.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        last = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)  # never half-written
        assert last["global_step"] < 40, "killed too late to test anything"
        resumed_from.append(last["global_step"])
    proc = launch("ckpt_path=last")
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    print(f"resumed from steps {resumed_from}")

    reference = tiny_cfg(tmp_path / "reference", *common[len(NO_CALLBACKS) :])
    module, datamodule, trainer = T.build(reference)
    trainer.fit(module, datamodule=datamodule)
    (folder,) = (run / "autoencoder").iterdir()
    final = Autoencoder.load(folder)
    for name, tensor in module.coder.state_dict().items():
        torch.testing.assert_close(final.state_dict()[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_checkpoint_writes_stay_atomic_when_tmpdir_is_another_filesystem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash in the middle of writing last.ckpt leaves the previous one intact (and no temporary file)."""
    other = Path("/dev/shm")
    if other.is_dir() and other.stat().st_dev != tmp_path.stat().st_dev:
        monkeypatch.setattr(tempfile, "tempdir", tempfile.mkdtemp(dir=other))  # Lightning's own staging spot
    _, _, trainer = T.build(tiny_cfg(tmp_path))
    io = trainer.strategy.checkpoint_io
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(4096)}, target)
    real_save = torch.save

    def crash_mid_write(obj: object, handle: object, *args: object, **kwargs: object) -> None:
        handle.write(b"half a checkpoint")  # type: ignore[attr-defined]
        raise KeyboardInterrupt  # stands for SIGKILL: the process dies here

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 2, "w": torch.ones(4096)}, target)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(target, weights_only=True)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    io.save_checkpoint({"global_step": 3, "w": torch.ones(4096)}, target)
    assert torch.load(target, weights_only=True)["global_step"] == 3


# --------------------------------------------------------------------------------------- safe loading
def test_pickle_bearing_checkpoint_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    evil = evil_checkpoint(tmp_path / "evil.ckpt", marker)
    with pytest.raises(CheckpointError, match=r"refusing to load .*evil\.ckpt.*pickled code/objects.*system"):
        safe_checkpoint(evil)
    with pytest.raises(CheckpointError, match=r"corrupt"):
        safe_checkpoint(garbage_file(tmp_path / "garbage.ckpt"))
    with pytest.raises(CheckpointError, match=r"does not exist"):
        safe_checkpoint(tmp_path / "nope.ckpt")
    assert not marker.exists()


def test_autoencoder_weights_load_only_from_safetensors(tmp_path: Path) -> None:
    """A folder holding pickled weights (model.pt / pytorch_model.bin) is refused: only model.safetensors loads."""
    coder = Autoencoder.from_config("mixed", d_model=16, layer=0, expansion=2, bottleneck=1)
    coder.save(tmp_path / "ok")
    assert Autoencoder.load(tmp_path / "ok") is not None
    pickled = tmp_path / "pickled"
    shutil.copytree(tmp_path / "ok", pickled)
    (pickled / "model.safetensors").unlink()
    marker = tmp_path / "PWNED"
    evil_checkpoint(pickled / "pytorch_model.bin", marker)
    evil_checkpoint(pickled / "model.pt", marker)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is missing"):
        Autoencoder.load(pickled)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ cli helpers
def test_disk_full_is_a_runtime_error_naming_the_file(capsys: pytest.CaptureFixture[str]) -> None:
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    with pytest.raises(SystemExit) as done, reported("bilae-test", where="/dev"):
        with open("/dev/full", "w") as handle:
            handle.write("x")
            handle.flush()
    assert done.value.code == 1
    err = capsys.readouterr().err
    assert (
        err.strip()
        == "bilae-test: error: no space left on the device while writing under /dev; free some space and resume"
    )


def test_oserrors_map_to_usage_or_runtime_errors() -> None:
    full = as_bilae_error(OSError(errno.ENOSPC, "No space left on device", "/out/metrics.json"))
    assert isinstance(full, TrainingError) and full.exit_code == 1 and "/out/metrics.json" in str(full)
    for code in (errno.EACCES, errno.EROFS, errno.ENOTDIR):
        denied = as_bilae_error(OSError(code, os.strerror(code), "/out"))
        assert isinstance(denied, UsageError) and denied.exit_code == 2 and "/out" in str(denied)
    assert as_bilae_error(OSError(errno.EIO, "I/O error")) is None  # unexpected: keeps its traceback
    assert as_bilae_error(ValueError("a bug")) is None


def test_debug_shows_the_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for env in ({}, {"BILAE_DEBUG": "1"}, {"HYDRA_FULL_ERROR": "1"}):
        for name in ("BILAE_DEBUG", "HYDRA_FULL_ERROR"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        with pytest.raises(SystemExit) as done, reported("bilae-test"):
            raise UsageError("bad value")
        err = capsys.readouterr().err
        assert done.value.code == 2 and err.strip().endswith("bilae-test: error: bad value")
        assert ("Traceback" in err) == bool(env)


def test_unexpected_errors_keep_their_traceback() -> None:
    with pytest.raises(ZeroDivisionError), reported("bilae-test"):
        1 / 0  # noqa: B018


def test_ensure_writable(tmp_path: Path) -> None:
    assert ensure_writable(tmp_path / "new" / "dir").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match=r"output directory .*file/sub is not writable \(Not a directory\)"):
        ensure_writable(tmp_path / "file" / "sub")
    with pytest.raises(UsageError, match=r"not writable"):
        ensure_writable(tmp_path / "file" / "sub", create=False)
    later = tmp_path / "later" / "run"
    assert ensure_writable(later, create=False) == later and not later.exists()  # leaves no trace


def test_sigterm_exits_143_and_says_how_to_resume(capsys: pytest.CaptureFixture[str]) -> None:
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    with pytest.raises(SystemExit) as done, reported("bilae-test", where="/runs/a"):
        raise SIGTERMException  # what Lightning raises at the batch boundary after SIGTERM (a SystemExit, code 0)
    assert done.value.code == 143
    assert "ckpt_path=/runs/a/checkpoints/interrupted.ckpt" in capsys.readouterr().err
