"""The LightningModule: one or several autoencoders stepped on the same activation batches."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from bilae.autoencoders import Autoencoder
from bilae.errors import TrainingError, UsageError
from bilae.optim import OptimizerConfig, build_optimizers, linear_schedule


class BilinearAutoencoderModule(L.LightningModule):
    """Trains autoencoders on activation batches ``{"acts": (N, d)}`` of real tokens.

    The activations come from the data side (:class:`~bilae.source.ActivationSource`: harvesting, the shuffling
    buffer or a cache), so the frozen LM is never part of this module, its parameters or its checkpoints. Each step
    takes one optimiser step for every autoencoder on the same activations, so a sweep over α or kinds pays for
    the LM only once.

    Args:
        coders: the autoencoder to train, or several (each keeps its own metrics, clipping and export).
        optimizer: optimiser settings (Muon by default).
        max_steps: total optimiser steps, for the linear learning-rate decay.
        alpha_warmup: steps over which α·scale rises linearly from 0 to α.
        grad_clip: maximum gradient norm per autoencoder and step (0 disables clipping).
        dead_window: a latent never active over this many steps counts as dead.
        dead_threshold: |f| above which a latent counts as active on a token.
    """

    def __init__(
        self,
        coders: Autoencoder | list[Autoencoder],
        *,
        optimizer: OptimizerConfig | None = None,
        max_steps: int = 1000,
        alpha_warmup: int = 256,
        grad_clip: float = 1.0,
        dead_window: int = 256,
        dead_threshold: float = 1e-4,
    ) -> None:
        super().__init__()
        coders = [coders] if isinstance(coders, Autoencoder) else list(coders)
        names = [c.config.name for c in coders]
        if not coders or len(set(names)) != len(names):
            raise UsageError(f"need one or more autoencoders with distinct names, got {names}")
        self.coders = nn.ModuleList(coders)
        self.optimizer_config = optimizer or OptimizerConfig()
        self.max_steps = max_steps
        self.alpha_warmup = alpha_warmup
        self.grad_clip = grad_clip
        self.dead_window = dead_window
        self.dead_threshold = dead_threshold
        self.automatic_optimization = False  # Muon for matrices and AdamW for vectors are two optimisers.
        self.tokens_seen: Tensor
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long))
        for i, coder in enumerate(coders):
            self.register_buffer(f"steps_since_active_{i}", torch.zeros(coder.d_features, dtype=torch.long))
        # Plain types only, so Lightning checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(
            {
                "optimizer": asdict(self.optimizer_config),
                "max_steps": max_steps,
                "alpha_warmup": alpha_warmup,
                "grad_clip": grad_clip,
                "dead_window": dead_window,
                "dead_threshold": dead_threshold,
                "autoencoders": [c.config.to_dict() for c in coders],
            }
        )

    @property
    def coder(self) -> Autoencoder:
        """The (first) autoencoder."""
        return self.typed_coders()[0]

    def typed_coders(self) -> list[Autoencoder]:
        """``self.coders`` (the ModuleList that registers them) as a typed list."""
        return list(self.coders)  # type: ignore[arg-type]

    def prefix(self, i: int) -> str:
        """Metric prefix of coder ``i``: none for a single coder, its name when several train together."""
        return "" if len(self.coders) == 1 else f"{self.typed_coders()[i].config.name}/"

    # ------------------------------------------------------------------------------------------ schedule
    def alpha_scale(self) -> float:
        """Warm-up factor s(t) = min(1, t / warmup) of the sparsity term."""
        if self.alpha_warmup <= 0:
            return 1.0
        return min(1.0, self.global_step / self.alpha_warmup)

    # ---------------------------------------------------------------------------------------------- steps
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        acts = batch["acts"]  # (N, d): the real tokens, from the data module's activation source
        scale = self.alpha_scale()
        total = acts.new_zeros((), dtype=torch.float32)
        log: dict[str, Tensor] = {}
        n_tokens = 0
        for i, coder in enumerate(self.typed_coders()):
            loss, metrics, f = coder.loss_and_features(acts, None, scale)
            total = total + loss
            n_tokens = f.shape[0]
            dead = self._track_dead(i, f)
            p = self.prefix(i)
            log |= {f"{p}train/{k}": v for k, v in metrics.items()}
            log |= {f"{p}train/loss": loss.detach(), f"{p}train/dead_fraction": dead}
            log[f"{p}train/alpha_scale"] = torch.tensor(coder.config.alpha * scale)
        self._check_finite(total)
        log |= self._step(total)
        self.tokens_seen += n_tokens
        log["train/tokens_seen"] = self.tokens_seen.float()
        log["lr"] = torch.tensor(self.optimizers_list()[0].param_groups[0]["lr"])
        self.log_dict(log, batch_size=n_tokens)
        self.log("mse", log[f"{self.prefix(0)}train/mse"], prog_bar=True, logger=False, batch_size=n_tokens)
        return total.detach()

    def _check_finite(self, loss: Tensor) -> None:
        # One host sync per step: a NaN must stop the run before it reaches the weights and the checkpoints.
        if not torch.isfinite(loss).item():
            raise TrainingError(
                f"non-finite loss ({loss.item()}) at step {self.global_step}; stopped before the optimiser step, "
                "so the last checkpoint is intact (check the activations: a layer with inf/NaN, or fp16 overflow)"
            )

    def _step(self, loss: Tensor) -> dict[str, Tensor]:
        optimizers = self.optimizers_list()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        norms = {}
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        for i, coder in enumerate(self.typed_coders()):
            params = [p for p in coder.parameters() if p.grad is not None]
            norms[f"{self.prefix(i)}train/grad_norm"] = torch.nn.utils.clip_grad_norm_(params, max_norm)
        # Only the first optimiser steps through Lightning: each LightningOptimizer.step() advances global_step,
        # and one training step must count once (AdamW for TopK's biases rides along unwrapped).
        optimizers[0].step()
        for opt in optimizers[1:]:
            opt.optimizer.step()
        schedulers = self.lr_schedulers()
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
            if scheduler is not None:
                scheduler.step()
        return norms

    def _track_dead(self, i: int, f: Tensor) -> Tensor:
        steps: Tensor = getattr(self, f"steps_since_active_{i}")
        active = (f.detach().abs() > self.dead_threshold).any(0)
        steps.add_(1).masked_fill_(active, 0)
        return (steps >= self.dead_window).float().mean()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        acts = batch["acts"]  # (N, d) real tokens
        n_tokens = acts.shape[0]
        if n_tokens == 0:
            return
        mses = []
        for i, coder in enumerate(self.typed_coders()):
            _, metrics = coder.loss(acts)
            p = self.prefix(i)
            mses.append(metrics["mse"])
            self.log(f"{p}val/density", metrics["density"], batch_size=n_tokens, sync_dist=True)
            if p:
                self.log(f"{p}val/mse", metrics["mse"], batch_size=n_tokens, sync_dist=True)
        # With several coders, val/mse (monitored by checkpoints) is their mean.
        self.log("val/mse", torch.stack(mses).mean(), prog_bar=True, batch_size=n_tokens, sync_dist=True)

    # ------------------------------------------------------------------------------------------ optimisers
    def optimizers_list(self) -> list:
        opts = self.optimizers()
        return opts if isinstance(opts, list) else [opts]

    def configure_optimizers(self) -> Any:
        # One Muon over every coder's matrices is the same as one Muon per coder: Muon's update is per matrix.
        optimizers = build_optimizers(self.coders, self.optimizer_config)
        schedulers = [linear_schedule(opt, self.max_steps, self.optimizer_config) for opt in optimizers]
        return optimizers, [{"scheduler": s, "interval": "step"} for s in schedulers]
