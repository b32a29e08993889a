"""Resume a run from its checkpoint alone: ``bilae-train ckpt_path=<run>/checkpoints/last.ckpt`` (or ``=<run>``).

Before Hydra composes anything, :func:`resume_arguments` turns that command line into the run's own: the overrides
the run was started with (``<run>/.hydra/overrides.yaml``), then any given now (a later value of the same key wins),
``hydra.run.dir=<run>`` so the run continues in its directory (and, through ``<run>/wandb-run.json``, in its W&B run),
and the checkpoint. The configuration this composes is checked against the one the run saved
(``<run>/.hydra/config.yaml``): an override that would change the model's shape is refused with one line naming the
key and both values, before anything is written.

Hydra records a resume attempt in ``<run>/.hydra/resume/``; :class:`AdoptResumeRecord` makes it the run's record
(``<run>/.hydra/``) only once the resumed run trains, so an attempt that fails (a mismatched seed, a bad value) never
changes what the next ``ckpt_path=...`` resumes with.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from bilae.errors import CheckpointError, UsageError

#: Keys whose value fixes the shape of the trained weights (a checkpoint cannot be loaded into another).
SHAPE_KEYS = (
    "model.name",
    "model.layer",
    "model.overrides",
    "autoencoder.kind",
    "autoencoder.expansion",
    "autoencoder.bottleneck",
    "autoencoder.affine",
)
RESUME_RECORD = ".hydra/resume"
"""Where Hydra records a resume attempt (relative to the run directory) until the resumed run trains."""
RECORD_FILES = ("config.yaml", "overrides.yaml", "hydra.yaml")
_FLAGS_THAT_SKIP = {"-m", "--multirun", "-h", "--help", "--hydra-help", "-i", "--info"}
_CKPT = re.compile(r"^\+{0,2}ckpt_path=(.*)$")
_PLAIN = re.compile(r"^[\w./:-]+$")


def resume_arguments(args: Sequence[str]) -> list[str]:
    """The ``bilae-train`` command line that resumes the run a ``ckpt_path=<checkpoint or run dir>`` points into.

    Unchanged when there is no such override, when it is ``last`` or null, for sweeps (``-m``) and help, and for a
    checkpoint outside a bilae-train run directory (it then needs the run's overrides on the command line).

    Raises:
        CheckpointError: the path does not exist, or a run directory without a checkpoint.
        UsageError: an override changes the model's shape.
    """
    args = list(args)
    index = next((i for i, a in enumerate(args) if _CKPT.match(a)), None)
    if index is None or _FLAGS_THAT_SKIP & set(args):
        return args
    value = _unquote(_CKPT.match(args[index]).group(1))  # type: ignore[union-attr]
    if value in ("", "last", "null", "None"):
        return args
    found = find_run(Path(value).expanduser())
    if found is None:
        return args
    checkpoint, run_dir = found
    rest = [a for i, a in enumerate(args) if i != index]
    flags = [a for a in rest if not _is_override(a)]
    given = [a for a in rest if _is_override(a) and not a.startswith("hydra.")]
    hydra = [a for a in rest if _is_override(a) and a.startswith("hydra.")]
    saved = [o for o in read_overrides(run_dir) if _key(o) != "ckpt_path"]  # an earlier resume's
    task = merge_overrides(saved, given)
    check_same_shape(run_dir, task)
    if not any(a.startswith("hydra.run.dir=") for a in hydra):
        hydra.append(f"hydra.run.dir={quote(str(run_dir))}")
    if not any(a.startswith("hydra.output_subdir=") for a in hydra):
        hydra.append(f"hydra.output_subdir={RESUME_RECORD}")
    return [*flags, *task, f"ckpt_path={quote(str(checkpoint))}", *hydra]


class AdoptResumeRecord(L.Callback):
    """Once a resumed run trains, its attempt's record (``.hydra/resume/``) becomes the run's (``.hydra/``).

    Args:
        run_dir: the run directory.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            adopt_resume_record(self.run_dir)


def adopt_resume_record(run_dir: Path) -> None:
    """Move the files of ``<run>/.hydra/resume/`` over those of ``<run>/.hydra/`` (each rename is atomic)."""
    staged = run_dir / RESUME_RECORD
    for name in RECORD_FILES:
        if (staged / name).is_file():
            os.replace(staged / name, run_dir / ".hydra" / name)


def is_resume_attempt() -> bool:
    """Whether the running Hydra job is a resume that :func:`resume_arguments` set up."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized() and HydraConfig.get().output_subdir == RESUME_RECORD


def find_run(path: Path) -> tuple[Path, Path] | None:
    """``(checkpoint, run directory)`` for a checkpoint file or a run directory; ``None`` outside a run directory.

    A run directory resumes from ``checkpoints/last.ckpt``, or from ``checkpoints/interrupted.ckpt`` when that one
    is newer (a run stopped by SIGTERM or an error saves it after its last scheduled checkpoint).
    """
    if not path.exists():
        raise CheckpointError(
            f"ckpt_path {str(path)!r} does not exist; give a .ckpt file written by bilae-train or its run directory"
        )
    if path.is_dir():
        if not is_run_dir(path):
            raise CheckpointError(
                f"ckpt_path {str(path)!r} is a directory but not a bilae-train run directory (no .hydra/config.yaml)"
            )
        return newest_checkpoint(path), path
    run_dir = next((p for p in path.parents if is_run_dir(p)), None)
    return None if run_dir is None else (path, run_dir)


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` is a Hydra run directory (it holds the run's saved config and overrides)."""
    return (path / ".hydra" / "config.yaml").is_file() and (path / ".hydra" / "overrides.yaml").is_file()


def newest_checkpoint(run_dir: Path) -> Path:
    """The checkpoint a run directory resumes from (see :func:`find_run`)."""
    candidates = [run_dir / "checkpoints" / name for name in ("last.ckpt", "interrupted.ckpt")]
    existing = [p for p in candidates if p.is_file()]
    if not existing:
        raise CheckpointError(
            f"run directory {run_dir} holds no checkpoints/last.ckpt (was it trained with checkpoint=none?)"
        )
    return max(existing, key=lambda p: p.stat().st_mtime)


def read_overrides(run_dir: Path) -> list[str]:
    """The task overrides a run was started with (``.hydra/overrides.yaml``)."""
    saved = OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")
    return [str(o) for o in saved] if saved else []  # type: ignore[union-attr]


def merge_overrides(saved: Sequence[str], given: Sequence[str]) -> list[str]:
    """``saved`` then ``given``, dropping the saved overrides of every key ``given`` sets again."""
    again = {_key(o) for o in given}
    return [o for o in saved if _key(o) not in again] + list(given)


def check_same_shape(run_dir: Path, overrides: Sequence[str]) -> None:
    """Refuse ``overrides`` that compose a model of another shape than the run saved in ``.hydra/config.yaml``."""
    from bilae.config import compose

    saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    now = compose("train", list(overrides))
    for key, old, new in shape_differences(saved, now):  # type: ignore[arg-type]
        raise UsageError(
            f"cannot resume {run_dir} with {key}={_show(new)}: the run was trained with {key}={_show(old)} "
            f"({run_dir / '.hydra' / 'config.yaml'}), so its checkpoint has another shape; drop the override "
            "or start a new run"
        )


def shape_differences(saved: DictConfig, now: DictConfig) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, new value)`` for each shape key that differs, and each autoencoder option that is a
    list in either config (a list trains one autoencoder per value, so it changes the number of coders)."""
    keys = list(SHAPE_KEYS)
    for node in (saved, now):
        options = OmegaConf.select(node, "autoencoder") or {}
        keys += [
            f"autoencoder.{k}"
            for k, v in options.items()
            if OmegaConf.is_list(v) and f"autoencoder.{k}" not in keys
        ]
    found = []
    for key in keys:
        old, new = _value(saved, key), _value(now, key)
        if old != new:
            found.append((key, old, new))
    return found


def quote(value: str) -> str:
    """``value`` as a Hydra override value: as is when plain, else single-quoted."""
    if _PLAIN.match(value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _value(cfg: DictConfig, key: str) -> Any:
    node = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
    return OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else node


def _show(value: Any) -> str:
    return "null" if value is None else str(value)


def _is_override(arg: str) -> bool:
    return not arg.startswith("-") and ("=" in arg or arg.startswith("~"))


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value
