"""Optimisers and schedules: Muon for matrices, AdamW for the rest, linear decay to zero."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from bilae.errors import unknown


@dataclass
class OptimizerConfig:
    """How the autoencoder is optimised (the paper: Muon, lr 0.03 decayed linearly to 0)."""

    name: str = "muon"
    """muon (2-D weights; AdamW for any others) or adam (AdamW for everything)."""
    lr: float = 0.03
    """Peak learning rate of the 2-D weights."""
    adam_lr: float = 1e-3
    """Learning rate of AdamW (biases under muon; everything under adam uses ``lr``)."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    momentum: float = 0.95
    """Muon momentum."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up steps before the linear decay."""
    decay: bool = True
    """Decay the learning rate linearly to 0 at the last step."""


def build_optimizers(module: nn.Module, config: OptimizerConfig) -> list[torch.optim.Optimizer]:
    """Muon over the matrices and AdamW over the vectors (or AdamW over everything)."""
    if config.name not in ("muon", "adam"):
        raise unknown("optimizer", config.name, ["muon", "adam"])
    params = [p for p in module.parameters() if p.requires_grad]
    if config.name == "adam":
        return [torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)]
    matrices = [p for p in params if p.ndim == 2]
    others = [p for p in params if p.ndim != 2]
    optimizers: list[torch.optim.Optimizer] = [
        torch.optim.Muon(matrices, lr=config.lr, weight_decay=config.weight_decay, momentum=config.momentum)
    ]
    if others:
        optimizers.append(torch.optim.AdamW(others, lr=config.adam_lr, weight_decay=config.weight_decay))
    return optimizers


def linear_schedule(optimizer: torch.optim.Optimizer, total_steps: int, config: OptimizerConfig) -> LambdaLR:
    """Warm up linearly for ``warmup_steps``, then decay linearly to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if config.warmup_steps and step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if not config.decay:
            return 1.0
        span = max(1, total_steps - config.warmup_steps)
        return max(0.0, 1.0 - (step - config.warmup_steps) / span)

    return LambdaLR(optimizer, factor)
