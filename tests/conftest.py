"""Shared fixtures: a fixed seed for every test and tiny CPU float32 defaults."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _grad_mode():
    """Restore autograd after each test: the tutorial script (run in-process) turns it off, as notebooks do."""
    enabled = torch.is_grad_enabled()
    yield
    torch.set_grad_enabled(enabled)
