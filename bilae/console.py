"""A quiet console: a progress bar that counts optimiser steps, and narrow filters for noise nobody can act on.

bilae trains for ``steps`` optimiser steps over as many passes of the data as that takes, so Lightning's bar, which
counts batches per epoch ("Epoch 2/-2", "36/20" after a resume), is replaced by :class:`StepProgressBar`
(``step 37/150``). Warnings are fixed at their cause where bilae can (the W&B logger, the exception checkpoint);
:func:`quiet_console` filters, by their exact message, the ones raised inside the libraries themselves.
"""

from __future__ import annotations

import logging
import re
import warnings
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import (
    CustomBarColumn,
    CustomTimeColumn,
    ProcessingSpeedColumn,
)
from rich.progress import ProgressColumn, Task
from rich.text import Text

#: Warnings raised inside Lightning and torch that say nothing about the user's run, by the start of their message:
#: Lightning's ModelCheckpoint assumes manual optimisation wants pre-step weights (bilae checkpoints the state after
#: step N, which is what a resume needs); Lightning 2.6 calls torch's deprecated ``LeafSpec``.
LIBRARY_WARNINGS = (
    "Using ModelCheckpoint with manual optimization and every_n_train_steps",
    "`isinstance(treespec, LeafSpec)` is deprecated",
)
#: Lightning's INFO lines that advertise a product rather than describe the run.
LIBRARY_TIPS = ("💡 Tip: For seamless cloud logging",)
_LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(LIBRARY_TIPS)


def quiet_console() -> None:
    """Silence the library messages in :data:`LIBRARY_WARNINGS` and :data:`LIBRARY_TIPS` (nothing else)."""
    for message in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message))
    for name in _LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())


class StepColumn(ProgressColumn):
    """``<description> <completed>/<total>``: ``step 37/150`` for training, ``Validation 2/4`` for validation."""

    def render(self, task: Task) -> Text:
        total = "--" if task.total is None or task.total == float("inf") else int(task.total)
        return Text.from_markup(f"{task.description} {int(task.completed)}/{total}")


class StepProgressBar(RichProgressBar):
    """Lightning's Rich progress bar, counting optimiser steps of the whole run instead of batches per epoch.

    One training task spans every epoch: its total is ``max_steps`` and its count is ``trainer.global_step``, so a
    resumed run continues at the step it resumed from (``step 37/150``).
    """

    @property
    def total_train_batches(self) -> int | float:
        max_steps = self.trainer.max_steps
        return max_steps if max_steps and max_steps > 0 else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        return "step"

    def configure_columns(self, trainer: L.Trainer) -> list:
        theme = self.theme
        return [
            StepColumn(),
            CustomBarColumn(
                complete_style=theme.progress_bar,
                finished_style=theme.progress_bar_finished,
                pulse_style=theme.progress_bar_pulse,
            ),
            CustomTimeColumn(style=theme.time),
            ProcessingSpeedColumn(style=theme.processing_speed),
        ]

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.is_disabled or self.progress is None:
            return
        if self.train_progress_bar_id is None:  # once per fit, not once per epoch
            self.train_progress_bar_id = self._add_task(self.total_train_batches, "step")
            self._update(self.train_progress_bar_id, trainer.global_step)
        self.refresh()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()
