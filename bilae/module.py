"""The LightningModule: a frozen LM harvested at one layer feeds a bilinear autoencoder."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import lightning as L
import torch
from torch import Tensor

from bilae.autoencoders import Autoencoder
from bilae.hooks import Harvester
from bilae.optim import OptimizerConfig, build_optimizers, linear_schedule


class BilinearAutoencoderModule(L.LightningModule):
    """Trains one autoencoder on the activations of a frozen LM.

    The LM lives in a :class:`~bilae.hooks.Harvester`, outside the module's parameters and checkpoints. Batches
    are token batches (``input_ids``, ``attention_mask``); each step harvests them, optionally mixes tokens
    across sequences in a shuffling buffer, and takes one optimiser step on the autoencoder loss.

    Args:
        coder: the autoencoder to train.
        harvester: the frozen LM and its hook; ``None`` when batches already hold activations
            (``acts``/``mask``, e.g. from an activation cache).
        optimizer: optimiser settings (Muon by default).
        max_steps: total optimiser steps, for the linear learning-rate decay.
        alpha_warmup: steps over which α·scale rises linearly from 0 to α.
        grad_clip: maximum gradient norm per step (0 disables clipping).
        buffer: optional shuffling buffer between harvesting and the autoencoder.
        dead_window: a latent never active over this many steps counts as dead.
        dead_threshold: |f| above which a latent counts as active on a token.
    """

    def __init__(
        self,
        coder: Autoencoder,
        harvester: Harvester | None = None,
        *,
        optimizer: OptimizerConfig | None = None,
        max_steps: int = 1000,
        alpha_warmup: int = 256,
        grad_clip: float = 1.0,
        buffer: Any = None,
        dead_window: int = 256,
        dead_threshold: float = 1e-4,
    ) -> None:
        super().__init__()
        self.coder = coder
        self.harvester = harvester
        self.optimizer_config = optimizer or OptimizerConfig()
        self.max_steps = max_steps
        self.alpha_warmup = alpha_warmup
        self.grad_clip = grad_clip
        self.buffer = buffer
        self.dead_window = dead_window
        self.dead_threshold = dead_threshold
        self.automatic_optimization = False  # Muon for matrices and AdamW for vectors are two optimisers.
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("steps_since_active", torch.zeros(coder.d_features, dtype=torch.long))
        # Plain types only, so Lightning checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(
            {
                "optimizer": asdict(self.optimizer_config),
                "max_steps": max_steps,
                "alpha_warmup": alpha_warmup,
                "grad_clip": grad_clip,
                "dead_window": dead_window,
                "dead_threshold": dead_threshold,
                "autoencoder": coder.config.to_dict(),
            }
        )

    # ------------------------------------------------------------------------------------------ data flow
    def setup(self, stage: str) -> None:
        if self.harvester is not None:
            self.harvester.to(self.device)

    def on_fit_start(self) -> None:
        if self.harvester is not None:
            self.harvester.to(self.device)

    def activations(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(acts (…, d), mask (…)) of a batch: harvested from tokens, or read as they are from a cache."""
        if "acts" in batch:
            return batch["acts"], batch["mask"].bool()
        if self.harvester is None:
            raise ValueError(
                "batches hold tokens but this module has no harvester (the LM) to turn them into activations"
            )
        return self.harvester(batch["input_ids"], batch["attention_mask"])

    def mix(self, acts: Tensor, mask: Tensor) -> Tensor:
        """Push a batch's real tokens into the shuffling buffer and draw as many random ones back.

        While the buffer is below half its capacity it keeps half of what comes in, so it fills over the first
        steps and then holds a steady reserve of tokens from many earlier sequences.
        """
        before = len(self.buffer)
        self.buffer.push(acts, mask)
        pushed = len(self.buffer) - before
        warm = len(self.buffer) >= self.buffer.capacity // 2
        return self.buffer.pop(pushed if warm else max(1, pushed // 2))

    def alpha_scale(self) -> float:
        """Warm-up factor s(t) = min(1, t / warmup) of the sparsity term."""
        if self.alpha_warmup <= 0:
            return 1.0
        return min(1.0, self.global_step / self.alpha_warmup)

    # ---------------------------------------------------------------------------------------------- steps
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        acts, mask = self.activations(batch)
        if self.buffer is not None:
            acts, mask = self.mix(acts, mask), None
        scale = self.alpha_scale()
        loss, metrics, f = self.coder.loss(acts, mask, scale=scale, return_features=True)
        self._step(loss)
        n_tokens = f.shape[0]
        self.tokens_seen += n_tokens
        self._track_dead(f)
        log = {f"train/{k}": v for k, v in metrics.items()}
        log |= {
            "train/loss": loss.detach(),
            "train/alpha_scale": torch.tensor(self.coder.config.alpha * scale),
            "train/tokens_seen": self.tokens_seen.float(),
            "train/dead_fraction": (self.steps_since_active >= self.dead_window).float().mean(),
            "lr": torch.tensor(self.optimizers_list()[0].param_groups[0]["lr"]),
        }
        self.log_dict(log, prog_bar=False, batch_size=n_tokens)
        self.log("mse", metrics["mse"], prog_bar=True, logger=False, batch_size=n_tokens)
        return loss.detach()

    def _step(self, loss: Tensor) -> None:
        optimizers = self.optimizers_list()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        params = [p for p in self.coder.parameters() if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.log("train/grad_norm", grad_norm, batch_size=1)
        # Only the first optimiser steps through Lightning: each LightningOptimizer.step() advances global_step,
        # and one training step must count once (AdamW for TopK's biases rides along unwrapped).
        optimizers[0].step()
        for opt in optimizers[1:]:
            opt.optimizer.step()
        schedulers = self.lr_schedulers()
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
            if scheduler is not None:
                scheduler.step()

    def _track_dead(self, f: Tensor) -> None:
        active = (f.detach().abs() > self.dead_threshold).any(0)
        self.steps_since_active.add_(1).masked_fill_(active, 0)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        acts, mask = self.activations(batch)
        _, metrics = self.coder.loss(acts, mask)
        n_tokens = int(mask.sum())
        self.log("val/mse", metrics["mse"], prog_bar=True, batch_size=n_tokens, sync_dist=True)
        self.log("val/density", metrics["density"], batch_size=n_tokens, sync_dist=True)

    # ------------------------------------------------------------------------------------------ optimisers
    def optimizers_list(self) -> list:
        opts = self.optimizers()
        return opts if isinstance(opts, list) else [opts]

    def configure_optimizers(self) -> Any:
        optimizers = build_optimizers(self.coder, self.optimizer_config)
        schedulers = [linear_schedule(opt, self.max_steps, self.optimizer_config) for opt in optimizers]
        return optimizers, [{"scheduler": s, "interval": "step"} for s in schedulers]

    # ---------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["autoencoder_config"] = self.coder.config.to_dict()
        if self.buffer is not None and hasattr(self.buffer, "state_dict"):
            checkpoint["shuffle_buffer"] = self.buffer.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.buffer is not None and "shuffle_buffer" in checkpoint:
            self.buffer.load_state_dict(checkpoint["shuffle_buffer"])
