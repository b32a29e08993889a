"""One error style for bilae's command-line tools: one line on stderr, a meaningful exit code, no traceback.

``bilae-<prog>: error: <message>`` and exit 2 for a usage error (a bad value, an unknown name, a missing or corrupt
file, a mismatch) or 1 for a runtime failure (a non-finite loss, a full disk). ``BILAE_DEBUG=1`` (or Hydra's own
``HYDRA_FULL_ERROR=1``) prints the traceback as well. Hydra's errors about the command line itself (an unknown
config group option or key) are Hydra's: a message naming the bad override and exit code 1.
"""

from __future__ import annotations

import errno
import functools
import os
import pickle
import signal
import sys
import tempfile
import threading
import traceback
import warnings
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from bilae.errors import BilaeError, CheckpointError, TrainingError, UsageError

F = TypeVar("F", bound=Callable[..., Any])

#: Exit code of a run stopped by SIGTERM or SIGINT after saving its checkpoint (the shell's 128 + SIGTERM).
INTERRUPTED_EXIT_CODE = 143

_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR}
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


def debug_enabled() -> bool:
    """Whether the user asked for tracebacks (``BILAE_DEBUG=1`` or ``HYDRA_FULL_ERROR=1``)."""
    return any(
        os.environ.get(name, "").lower() in ("1", "true", "yes")
        for name in ("BILAE_DEBUG", "HYDRA_FULL_ERROR")
    )


def as_bilae_error(err: BaseException, where: str | Path | None = None) -> BilaeError | None:
    """The :class:`BilaeError` an expected failure stands for, or ``None`` for a bug (which keeps its traceback).

    ``where`` names the place written to when the OSError itself names no file (a failed ``write`` or ``flush``).
    """
    if isinstance(err, BilaeError):
        return err
    if isinstance(err, MissingMandatoryValue):  # a `???` the user did not fill in, e.g. cache.dir or data.dir
        key = err.full_key or "a required setting"
        return UsageError(f"missing value for {key}: give {key}=<value> on the command line")
    if isinstance(err, OSError) and err.errno in _DISK_FULL:
        return TrainingError(
            f"no space left on the device while writing {_where(err, where)}; free some space and resume"
        )
    if isinstance(err, OSError) and err.errno in _NOT_WRITABLE:
        return UsageError(
            f"cannot write {_where(err, where)} ({os.strerror(err.errno)}); choose a writable output directory"
        )
    return None


def _where(err: OSError, where: str | Path | None) -> str:
    names = [_target_of(str(name)) for name in (err.filename, err.filename2) if name]
    return " -> ".join(names) or (f"under {where}" if where else "the output")


def _target_of(name: str) -> str:
    """The file an atomic write was writing: ``dir/.last.ckpt.x1y2.tmp`` → ``dir/last.ckpt``."""
    path = Path(name)
    if path.name.startswith(".") and path.name.endswith(".tmp") and path.name.count(".") >= 3:
        return str(path.with_name(path.name[1:].rsplit(".", 2)[0]))
    return name


def fail(prog: str, err: BilaeError) -> NoReturn:
    """Print ``bilae-<prog>: error: <message>`` (the traceback too in debug mode) and exit with the error's code."""
    if debug_enabled():
        traceback.print_exc()
    print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
    sys.exit(err.exit_code)


@contextmanager
def reported(prog: str, where: str | Path | None = None) -> Iterator[None]:
    """Turn bilae's errors (and a full or read-only disk) into one line on stderr and an exit code.

    SIGTERM (Lightning's ``SIGTERMException``, a ``SystemExit`` with code 0) becomes exit code 143, so a scheduler
    sees that the run did not finish; Ctrl+C (which Lightning turns into ``exit(1)`` after saving its exception
    checkpoint) becomes exit code 130. Both say how to resume. ``where`` (the output directory) is named when a
    failed write names no file.
    """
    with sigint_seen() as seen:
        try:
            yield
        except BaseException as err:
            resume = f" or ckpt_path={Path(where) / 'checkpoints' / 'interrupted.ckpt'}" if where else ""
            if isinstance(err, KeyboardInterrupt) or (seen and isinstance(err, SystemExit)):
                print(
                    f"{prog}: error: interrupted (Ctrl+C); resume with ckpt_path=last{resume}",
                    file=sys.stderr,
                    flush=True,
                )
                sys.exit(130)
            if type(err).__name__ == "SIGTERMException":
                print(
                    f"{prog}: error: stopped by SIGTERM; resume with ckpt_path=last{resume}",
                    file=sys.stderr,
                    flush=True,
                )
                sys.exit(INTERRUPTED_EXIT_CODE)
            mapped = as_bilae_error(err, where) if isinstance(err, Exception) else None
            if mapped is None:
                raise
            fail(prog, mapped)


@contextmanager
def sigint_seen() -> Iterator[list[int]]:
    """A list that records a SIGINT (Ctrl+C) while the block runs; the signal still raises KeyboardInterrupt."""
    seen: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield seen
        return

    def record(signum: int, frame: Any) -> None:
        seen.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, record)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, previous)


def cli(prog: str) -> Callable[[F], F]:
    """Decorator for an entry point: its expected errors end the program through :func:`reported`."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with reported(prog):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def ensure_writable(path: str | Path, *, create: bool = True) -> Path:
    """Check that files can be written in directory ``path``; the error names it.

    ``create=True`` creates the directory; ``create=False`` leaves no trace and probes the nearest existing ancestor
    (for a directory that will only be created later, e.g. a Hydra run directory named after the time).
    Probing by writing a file is the only check that also holds for root, for whom permission bits do not count.
    """
    path = Path(path)
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
        probe_dir = path if create else next(p for p in (path, *path.parents) if p.exists())
        if not probe_dir.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{probe_dir} is a file", str(probe_dir))
        fd, probe = tempfile.mkstemp(prefix=".bilae-write-check-", dir=probe_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = os.strerror(err.errno) if err.errno else str(err)
        raise UsageError(
            f"output directory {path} is not writable ({reason}); choose another hydra.run.dir"
        ) from None
    return path


class CheckOutputDir(HydraCallback):
    """Hydra callback: refuse an unwritable run (or sweep) directory, and a config with an out-of-range or
    wrongly typed value, before Hydra creates the directory or writes its ``.hydra/`` record there.

    Hydra would answer an unwritable directory with a traceback, and would overwrite an existing run's record
    before the command found its bad value.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, config.hydra.run.dir, preflight=True)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, config.hydra.sweep.dir, preflight=False)  # each job checks its own values

    def _check(self, config: DictConfig, directory: str, *, preflight: bool) -> None:
        prog = f"bilae-{config.hydra.job.name}"
        try:
            ensure_writable(directory, create=False)
            if preflight:
                check_config(str(config.hydra.job.name), config)
        except UsageError as err:
            fail(prog, err)


def check_config(job: str, cfg: DictConfig) -> None:
    """The checks of :mod:`bilae.validation` for the command ``job`` (train, analyze or cache)."""
    from bilae import validation

    checks = {
        "train": validation.check_train,
        "analyze": validation.check_analyze,
        "cache": validation.check_cache,
    }
    if job in checks:
        checks[job](cfg)


def safe_checkpoint(path: str | Path) -> str:
    """Check that a Lightning checkpoint holds only tensors and plain values before anything unpickles it.

    ``torch.load(weights_only=True)`` refuses pickled code, so a checkpoint from an untrusted source cannot run
    anything here, whatever Lightning or ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` would do afterwards.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; give a .ckpt file written by bilae-train")
    try:
        with (
            warnings.catch_warnings()
        ):  # unknown pickle protocols in garbage files: the error below says it all
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if zipfile.is_zipfile(path):
            detail = next((line for line in str(err).splitlines() if "GLOBAL" in line), "not plain tensors")
            raise CheckpointError(
                f"refusing to load {path}: it contains pickled code/objects: {detail.strip()}"
            ) from None
        raise CheckpointError(f"checkpoint {path} is corrupt: not a PyTorch checkpoint") from None
    except Exception as err:  # noqa: BLE001 - any failure to parse arbitrary bytes means a corrupt file
        # Unpickling random bytes can fail in any way (IndexError: pop from empty list, KeyError, MemoryError...).
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({type(err).__name__}: {first})"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"checkpoint {path} is not a Lightning checkpoint (no 'state_dict')")
    return str(path)
