"""Reliability: one clear error line per bad input, safe checkpoint loading, SIGKILL/NaN survival (tiny Qwen3, CPU).

The bad-input table runs through the real console-script path (``bilae.train.main``: Hydra, bilae's error reporting,
``sys.exit``) in one subprocess (tests/support/crafted.py), so the imports are paid once; its last case ends that
process for real, checking the process exit status too.

Non-writable output directories: the tests run as root, for whom ``chmod 555`` blocks nothing, so they point the
run directory below a regular file (``ENOTDIR``), which fails for every user.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import torch

from bilae import Autoencoder
from bilae.builders import build
from tests.support.configs import TINY, cli, cli_env, train_cfg
from tests.support.crafted import evil_checkpoint, garbage_file, split_cases, truncate

ENV = cli_env()
# Until conf/hydra/default.yaml lists it: the Hydra callback that refuses an unwritable run directory up front.
CHECK_DIR = "++hydra.callbacks.check_output_dir._target_=bilae.cli.CheckOutputDir"
NO_CALLBACKS = [t for t in TINY if not t.startswith("callbacks=")]
# With manual optimisation, Lightning 2.6 defers ModelCheckpoint(every_n_train_steps) until the monitored val/mse
# has been logged once; these runs never validate, so they checkpoint every step without a monitor.
MONITOR_NONE = "callbacks.checkpoint.monitor=null"
HYDRA_OWN = {".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "train.log"}
FAULT = "+callbacks.fault._target_=tests.support.faults.KillAt"


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
    cmd = cli("tests.support.crafted", str(spec))
    done = subprocess.run(cmd, cwd=tmp_path, env=env or ENV, capture_output=True, text=True, timeout=900)
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
        "+callbacks.poison._target_=tests.support.faults.PoisonActivations", "+callbacks.poison.step=3",
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


# ------------------------------------------------------------------------------------ SIGTERM and SIGKILL
STEPS = 16
COMMON = [*NO_CALLBACKS, f"steps={STEPS}", "trainer.val_check_interval=100", "callbacks=[checkpoint,on_exception]",
          "callbacks.checkpoint.every_n_train_steps=1", MONITOR_NONE]  # fmt: skip


def launch(run: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """bilae-train in a subprocess (its own signals, its own exit code), writing into ``run``."""
    cmd = cli("bilae.train", *COMMON, f"hydra.run.dir={run}", *extra)
    return subprocess.run(cmd, cwd=run.parent, env=ENV, capture_output=True, text=True, timeout=900)


def checkpoint_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def assert_same_weights_as_an_uninterrupted_run(run: Path, tmp_path: Path) -> None:
    reference = train_cfg(tmp_path / "reference", *COMMON[len(NO_CALLBACKS) :])
    module, datamodule, trainer = build(reference)
    trainer.fit(module, datamodule=datamodule)
    (folder,) = (run / "autoencoder").iterdir()
    final = Autoencoder.load(folder)
    for name, tensor in module.coder.state_dict().items():
        torch.testing.assert_close(final.state_dict()[name], tensor, rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_that_resumes_exactly(tmp_path: Path) -> None:
    run = tmp_path / "run"
    stopped = launch(run, FAULT, "+callbacks.fault.step=6", "+callbacks.fault.signal=SIGTERM")
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "SIGTERM" in stopped.stderr and "ckpt_path" in stopped.stderr and "Traceback" not in stopped.stderr
    interrupted = run / "checkpoints" / "interrupted.ckpt"
    # The handler only flags the signal: step 6 finishes (its checkpoint included) and Lightning stops at the next
    # batch boundary, saving interrupted.ckpt of the same step.
    assert checkpoint_step(interrupted) == 6 and checkpoint_step(run / "checkpoints" / "last.ckpt") == 6
    done = launch(run, f"ckpt_path={interrupted}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_weights_as_an_uninterrupted_run(run, tmp_path)


@pytest.mark.slow
def test_sigkill_after_a_step_and_mid_write_then_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    checkpoints = run / "checkpoints"
    # 1. Killed right after step 5: its checkpoint was never written, the last one is step 4.
    killed = launch(run, FAULT, "+callbacks.fault.step=5")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert checkpoint_step(checkpoints / "last.ckpt") == 4
    # 2. Resumed, then killed halfway through writing last.ckpt of step 11: the step-10 file is intact, and the
    #    half-written temporary file beside it proves the kill landed mid-write.
    killed = launch(run, "ckpt_path=last", FAULT, "+callbacks.fault.step=11", "+callbacks.fault.during=write")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert checkpoint_step(checkpoints / "last.ckpt") == 10
    partial = list(checkpoints.glob(".last.ckpt.*.tmp"))
    assert len(partial) == 1 and 0 < partial[0].stat().st_size < (checkpoints / "last.ckpt").stat().st_size
    # 3. Resumed to the end: the same weights as a run that was never interrupted.
    done = launch(run, "ckpt_path=last")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((run / "metrics.json").read_text())["steps"] == STEPS
    assert_same_weights_as_an_uninterrupted_run(run, tmp_path)


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tmp_path: Path) -> None:
    run = tmp_path / "run"
    stopped = launch(run, FAULT, "+callbacks.fault.step=3", "+callbacks.fault.signal=SIGINT")
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    lines = [line for line in stopped.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith("bilae-train: error: interrupted (Ctrl+C)"), lines
    assert (
        f"ckpt_path={run / 'checkpoints' / 'interrupted.ckpt'}" in lines[0]
        and "Traceback" not in stopped.stderr
    )
    assert checkpoint_step(run / "checkpoints" / "interrupted.ckpt") == 3
