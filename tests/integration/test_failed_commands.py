"""A command that fails leaves what was there byte-identical: an existing cache, the checkpoint a resume came from."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import torch

from bilae.builders import build
from bilae.cache_writer import build_cache
from tests.support.configs import TINY, TINY_DATA, cache_cfg, cached_train_cfg, cli, cli_env

FAULT = "+callbacks.fault._target_=tests.support.faults.KillAt"


def digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def run(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli(module, *args), cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=900
    )


def error_lines(stderr: str, prog: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"{prog}: error:")]


@pytest.mark.slow
def test_a_failed_cache_overwrite_keeps_the_old_cache_which_still_trains(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    build_cache(cache_cfg(cache))
    (cache / "NOTES.md").write_text("the user's own notes\n")  # not bilae's: never touched
    before = digest(cache)
    args = [
        *TINY_DATA,
        "data.max_sequences=160",
        f"cache.dir={cache}",
        "cache.overwrite=true",
        "model.layer=99",
    ]
    failed = run("bilae.cache", *args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr[-2000:]
    (line,) = error_lines(failed.stderr, "bilae-cache")
    assert "layer 99" in line
    assert digest(cache) == before, "the failed overwrite changed the old cache"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".cache.partial")] == []
    # The old cache still trains.
    module, datamodule, trainer = build(
        cached_train_cfg(tmp_path / "train", cache, "steps=2", "data.batch_tokens=200")
    )
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 2
    # A successful overwrite replaces bilae's files only.
    build_cache(cache_cfg(cache, "cache.overwrite=true", "cache.shard_tokens=500", "cache.dtype=float32"))
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["dtype"] == "float32" and (cache / "NOTES.md").read_text() == "the user's own notes\n"
    listed = {e["file"] for split in meta["splits"].values() for e in split["shards"]}
    assert {str(p.relative_to(cache)) for p in cache.glob("*/*.safetensors")} == listed, (
        "no stale shard is left"
    )


@pytest.mark.slow
def test_a_failed_resume_keeps_the_checkpoint_it_resumed_from(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    common = [*[t for t in TINY if not t.startswith("callbacks=")], "steps=12", "trainer.val_check_interval=100",
              "callbacks=[checkpoint,on_exception]", "callbacks.checkpoint.monitor=null", f"hydra.run.dir={run_dir}"]  # fmt: skip
    stopped = run("bilae.train", *common, FAULT, "+callbacks.fault.step=4", "+callbacks.fault.signal=SIGTERM",
                  cwd=tmp_path)  # fmt: skip
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    interrupted = run_dir / "checkpoints" / "interrupted.ckpt"
    original = interrupted.read_bytes()
    for bad in ("autoencoder.expansion=4", "seed=1"):  # another shape; another data order
        failed = run("bilae.train", *common, bad, f"ckpt_path={interrupted}", cwd=tmp_path)
        assert failed.returncode != 0, f"{bad}: the mismatched resume ran"
        assert interrupted.read_bytes() == original, f"{bad}: the failed resume rewrote interrupted.ckpt"
    done = run("bilae.train", *common, f"ckpt_path={interrupted}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    final = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert final["global_step"] == 12


@pytest.mark.slow
def test_a_full_disk_keeps_the_last_checkpoint_and_the_previous_export(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    common = [*[t for t in TINY if not t.startswith("callbacks=")], "trainer.val_check_interval=100",
              "callbacks=[checkpoint,on_exception]", "callbacks.checkpoint.monitor=null", "callbacks.checkpoint.every_n_train_steps=1",
              f"hydra.run.dir={run_dir}"]  # fmt: skip
    disk = "+callbacks.disk._target_=tests.support.faults.DiskFull"
    # The disk fills while writing the checkpoint of step 4: exit 1, one line; last.ckpt is the complete step 3.
    full = run("bilae.train", *common, "steps=6", disk, "+callbacks.disk.step=4", cwd=tmp_path)
    assert full.returncode == 1 and "Traceback" not in full.stderr, full.stderr[-2000:]
    (line,) = error_lines(full.stderr, "bilae-train")
    assert "no space left on the device while writing" in line and "step000004" in line, line
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 3
    assert not list((run_dir / "checkpoints").glob(".*.tmp")), "the half-written file was removed"
    # Resumed to the end, it exports; resumed again for longer, the disk fills while exporting: the earlier
    # export is byte-identical.
    done = run("bilae.train", *common, "steps=6", "ckpt_path=last", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    export = digest(run_dir / "autoencoder")
    full = run("bilae.train", *common, "steps=8", "ckpt_path=last", disk, "+callbacks.disk.during=export",
               cwd=tmp_path)  # fmt: skip
    assert full.returncode == 1 and "Traceback" not in full.stderr, full.stderr[-2000:]
    (line,) = error_lines(full.stderr, "bilae-train")
    assert "no space left on the device while writing" in line and "model.safetensors" in line, line
    assert digest(run_dir / "autoencoder") == export, "the failed export changed the previous one"
