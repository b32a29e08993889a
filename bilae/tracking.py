"""One W&B run per Hydra job: named after the job, grouped by its sweep, resumable from its run directory.

Lightning's ``WandbLogger`` reuses a ``wandb.run`` that is still in progress, so without care every job of a
``-m`` sweep logs into the first job's run. Here each job gets a fresh run id (or, when it resumes, the id stored in
its run directory), a name (the run directory, or ``<sweep>/<job number> <swept values>``), its sweep as the group,
and the resolved config; the entry point finishes the run at the end of the job with the final metrics as summary.

The id, name and group of a job's run are stored in ``<run dir>/wandb-run.json`` as soon as the run starts, so
``bilae-train ckpt_path=<run>/checkpoints/last.ckpt`` continues the same W&B run.
"""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from omegaconf import DictConfig, OmegaConf

from bilae.autoencoders.checkpoint import atomic_write_text

RUN_FILE = "wandb-run.json"
"""Where a job stores its W&B run's id, name and group (in its run directory)."""


class WandbLogger(LightningWandbLogger):
    """Lightning's W&B logger that stores its run's identity in ``save_dir`` and finishes the run on request.

    It takes the arguments of :class:`lightning.pytorch.loggers.WandbLogger`; ``anonymous`` is never passed on
    (wandb ≥ 0.19 warns that the setting has no effect, and Lightning always sends it).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._wandb_init.pop("anonymous", None)
        self._stored = False

    @property
    def experiment(self) -> Any:
        run = super().experiment
        if not self._stored and self.save_dir and getattr(run, "id", None):
            self._stored = True
            identity = {"id": run.id, "name": run.name, "group": run.group, "project": run.project}
            atomic_write_text(Path(self.save_dir) / RUN_FILE, json.dumps(identity, indent=2) + "\n")
        return run

    def finish(self, summary: dict[str, Any] | None = None, *, exit_code: int = 0) -> None:
        """Write ``summary`` (final metrics) into the run's summary and finish it (no-op if it never started)."""
        if self._experiment is None:
            return
        if summary:
            self._experiment.summary.update(summary)
        self._experiment.finish(exit_code=exit_code)


def finish_runs(loggers: Iterable[Any], summary: dict[str, Any] | None = None, *, exit_code: int = 0) -> None:
    """Finish the W&B run of each bilae :class:`WandbLogger` in ``loggers`` (the next job starts a fresh one)."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.finish(summary, exit_code=exit_code)


def is_wandb(node: Any) -> bool:
    """Whether a logger config node builds a W&B logger."""
    return str(node.get("_target_", "")).endswith("WandbLogger")


def wandb_arguments(cfg: DictConfig, node: DictConfig) -> dict[str, Any]:
    """Keyword arguments that make a W&B logger node this job's own run.

    A value set in the node (``logger.wandb.name=...``) wins. A run that resumes (``ckpt_path`` set) and whose
    run directory holds :data:`RUN_FILE` continues that run; any other job starts a fresh one.
    """
    stored = stored_run(node.get("save_dir")) if cfg.get("ckpt_path") else {}
    name, group = job_name_and_group()
    chosen = {
        "id": node.get("id") or stored.get("id") or new_run_id(),
        "name": node.get("name") or stored.get("name") or name,
        "group": node.get("group") or stored.get("group") or group,
    }
    if "config" not in node:
        chosen["config"] = resolved(cfg)
    return chosen


def new_run_id() -> str:
    """A fresh W&B run id: eight random lowercase letters and digits (W&B's own format)."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def stored_run(run_dir: str | None) -> dict[str, Any]:
    """The identity a job stored in ``run_dir`` (empty if none or unreadable)."""
    path = Path(run_dir or ".") / RUN_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def resolved(cfg: DictConfig) -> dict[str, Any]:
    """The job's config with every interpolation resolved (as written where it cannot be resolved)."""
    try:
        data = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - e.g. ${hydra:...} outside a Hydra job: log the config as written
        data = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(data, dict)
    return {str(k): v for k, v in data.items()}


def job_name_and_group() -> tuple[str | None, str | None]:
    """``(name, group)`` of the running Hydra job; ``(None, None)`` outside one.

    A single run is named after its directory (``2026-01-31/12-00-00``). A sweep's job is named
    ``<sweep>/<job number>`` followed by its swept values (``2026-01-31/12-00-00/1 autoencoder.alpha=0.1``) and
    grouped under ``<sweep>``.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None, None
    hydra = HydraConfig.get()
    if hydra.mode == RunMode.MULTIRUN:
        sweep = Path(hydra.sweep.dir)
        group = "/".join(sweep.parts[-2:])
        label = swept_values(sweep, list(hydra.overrides.task))
        return f"{group}/{hydra.job.num}" + (f" {label}" if label else ""), group
    return "/".join(Path(hydra.runtime.output_dir).parts[-2:]), None


def swept_values(sweep_dir: Path, job_overrides: Sequence[str]) -> str:
    """This job's values of the keys its sweep varies, e.g. ``autoencoder.alpha=0.1`` (from ``multirun.yaml``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        saved = OmegaConf.load(sweep_dir / "multirun.yaml")
        parsed = OverridesParser.create().parse_overrides(list(saved.hydra.overrides.task))
    except Exception:  # noqa: BLE001 - no or unreadable sweep record: the job number alone names the job
        return ""
    swept = {o.key_or_group for o in parsed if o.is_sweep_override()}
    return " ".join(o for o in job_overrides if override_key(o) in swept)


def override_key(override: str) -> str:
    """The key (or config group) an override sets: ``+a.b=1`` → ``a.b``, ``~c`` → ``c``, ``m@pkg=x`` → ``m``."""
    return override.lstrip("+~").split("=", 1)[0].split("@", 1)[0]
