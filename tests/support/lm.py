"""Test helpers around language models."""

from __future__ import annotations

from torch import nn


def count_calls(modules: list[nn.Module]) -> tuple[list[int], list]:
    """Count forward calls of each module; returns the live counts and the hook handles to remove."""
    counts = [0] * len(modules)

    def hook(index: int):
        def bump(*_):
            counts[index] += 1

        return bump

    return counts, [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]
