"""The CLI's error style and safe loading: one line and an exit code, corrupt or pickled files refused, atomic writes."""

from __future__ import annotations

import errno
import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from bilae import Autoencoder
from bilae.builders import build_trainer
from bilae.cli import as_bilae_error, ensure_writable, reported, safe_checkpoint
from bilae.errors import CheckpointError, TrainingError, UsageError
from tests.support.configs import train_cfg
from tests.support.crafted import evil_checkpoint, garbage_file


def test_checkpoint_writes_stay_atomic_when_tmpdir_is_another_filesystem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash in the middle of writing last.ckpt leaves the previous one intact (and no temporary file)."""
    other = Path("/dev/shm")
    if not other.is_dir() or other.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip(
            "needs /dev/shm on another filesystem than the test's tmp_path (the cross-device premise)"
        )
    monkeypatch.setattr(tempfile, "tempdir", tempfile.mkdtemp(dir=other))  # Lightning's own staging spot
    assert Path(tempfile.gettempdir()).stat().st_dev != tmp_path.stat().st_dev
    trainer = build_trainer(train_cfg(tmp_path))
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


FUZZ_SEED = 1234


def test_every_corrupt_file_gets_the_one_clear_error(tmp_path: Path) -> None:
    """1,000 seeded random byte strings, some behind pickle or zip headers: each is one CheckpointError.

    (Some unpickle far enough to raise IndexError or KeyError inside torch's weights-only unpickler.)
    """
    rng = random.Random(FUZZ_SEED)
    headers = [b"", b"\x80\x02", b"\x80\x04\x95", b"PK\x03\x04", b"PK\x05\x06"]
    escaped: dict[str, int] = {}
    for i in range(1000):
        path = tmp_path / f"{i}.ckpt"
        path.write_bytes(rng.choice(headers) + rng.randbytes(rng.randint(0, 600)))
        try:
            safe_checkpoint(path)
        except CheckpointError as err:
            assert str(path) in str(err) and "\n" not in str(err)
        except BaseException as err:  # noqa: BLE001 - what the test is looking for
            escaped[f"{i}: {type(err).__name__}"] = i
    assert not escaped, f"seed {FUZZ_SEED}: not turned into the clear error: {escaped}"


def test_autoencoder_weights_load_only_from_safetensors(tmp_path: Path) -> None:
    """A folder holding pickled weights (model.pt / pytorch_model.bin) is refused: only model.safetensors loads."""
    coder = Autoencoder.from_config("mixed", d_model=16, layer=0, expansion=2, bottleneck=1)
    coder.save(tmp_path / "ok")
    loaded = Autoencoder.load(tmp_path / "ok")
    assert torch.equal(loaded.left, coder.left) and torch.equal(loaded.down, coder.down)
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
    staged = as_bilae_error(
        OSError(errno.ENOSPC, "No space left on device", "/out/ckpts/.last.ckpt.k2x_9.tmp")
    )
    assert "/out/ckpts/last.ckpt;" in str(staged), "an atomic write's temporary file is named by its target"
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
