"""Optimisers and schedules: Muon for matrices, AdamW for the rest, linear decay to zero."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.optim._muon as _muon
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


class Muon(torch.optim.Muon):
    """``torch.optim.Muon`` that orthogonalises in float32 when its parameters live on the CPU.

    torch's Newton–Schulz iteration runs in bfloat16, which is fast on GPUs but ~100× slower than float32 on
    most CPUs (no bf16 matrix units): one step of a 1536×384 matrix took 30 s on a 2-core CPU instead of 0.1 s.
    On the CPU the same iteration runs in float32 (a little more precise, otherwise identical); elsewhere
    nothing changes.
    """

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        on_cpu = all(p.device.type == "cpu" for group in self.param_groups for p in group["params"])
        if not on_cpu:
            return super().step(closure)
        with _float32_newton_schulz():
            return super().step(closure)


@contextmanager
def _float32_newton_schulz() -> Iterator[None]:
    original = _muon._zeropower_via_newtonschulz
    _muon._zeropower_via_newtonschulz = newton_schulz_float32
    try:
        yield
    finally:
        _muon._zeropower_via_newtonschulz = original


def newton_schulz_float32(
    grad: torch.Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int, eps: float
) -> torch.Tensor:
    """torch's quintic Newton–Schulz orthogonalisation (same coefficients and steps), computed in float32."""
    a, b, c = ns_coefficients
    x = grad.float()
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


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
        Muon(matrices, lr=config.lr, weight_decay=config.weight_decay, momentum=config.momentum)
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
