"""Where the coders' activations come from: harvesting, the shuffling buffer, or a cache, in one object.

The LightningModule never sees tokens. A :class:`SourcedDataModule` (the text and the cache data modules) owns an
:class:`ActivationSource` (its ``activations``); right after a batch reaches the device (Lightning's ``on_after_batch_transfer``) the
source turns it into the real tokens' activations ``{"acts": (N, d)}``:

    token batch {"input_ids", "attention_mask"}  -- harvester (frozen LM, stopped after the layer) --> acts, mask
    cached batch {"acts", "mask"}                                                            --> acts, mask
    training only: real tokens --> ShuffleBuffer (warm-up: keep half while below half full) --> N random tokens

The source's state (the buffer's tokens and generator) is the data module's ``state_dict``, which Lightning saves in
every checkpoint, so a resumed run continues exactly.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor

from bilae.errors import TrainingError, UsageError
from bilae.hooks import Harvester


class ShuffleBuffer:
    """Mixes harvested tokens across sequences, so one autoencoder batch is not a handful of documents.

    ``push`` stores the real tokens of an LM batch; ``pop(n)`` removes ``n`` tokens drawn uniformly at random.
    Storage lives on the activations' device; the draw uses a seeded CPU generator, so a run is deterministic and
    ``state_dict()`` (contents + generator state) lets a resumed run continue exactly.

    Args:
        capacity: most tokens held; a few LM batches' worth mixes well.
        seed: seed of the draw.
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity <= 0:
            raise UsageError(f"ShuffleBuffer capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.generator = torch.Generator().manual_seed(seed)
        self.storage: Tensor | None = None
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def push(self, acts: Tensor, mask: Tensor) -> None:
        """Store the tokens of ``acts`` (B, T, d) where ``mask`` (B, T) is True.

        Selecting the real tokens costs one host sync per push (their count); the draws in ``pop`` cost none.
        """
        tokens = acts[mask.bool()].detach()
        if self.size + len(tokens) > self.capacity:
            raise UsageError(
                f"ShuffleBuffer overflow: {self.size} + {len(tokens)} tokens exceed capacity {self.capacity}; "
                "pop before pushing more or raise the capacity"
            )
        if self.storage is None:
            self.storage = tokens.new_empty((self.capacity, tokens.shape[-1]))
        elif self.storage.device != tokens.device:  # restored on CPU from a checkpoint, training on GPU
            self.storage = self.storage.to(tokens.device)
        self.storage[self.size : self.size + len(tokens)] = tokens
        self.size += len(tokens)

    def pop(self, n: int) -> Tensor:
        """Remove and return ``n`` random tokens, (n, d)."""
        if not 0 < n <= self.size:
            raise UsageError(
                f"cannot pop {n} tokens from a ShuffleBuffer holding {self.size}; valid 1..{self.size}"
            )
        assert self.storage is not None
        order = torch.randperm(self.size, generator=self.generator).to(self.storage.device, non_blocking=True)
        batch = self.storage[order[:n]]
        # Compact the survivors to the front (a gather, no host sync); their new order is random too.
        self.storage[: self.size - n] = self.storage[order[n:]]
        self.size -= n
        return batch

    def state_dict(self) -> dict:
        # A snapshot: on the CPU, .cpu() alone would return a view that later pushes overwrite.
        stored = None if self.storage is None else self.storage[: self.size].to("cpu", copy=True)
        return {"tokens": stored, "generator": self.generator.get_state(), "capacity": self.capacity}

    def load_state_dict(self, state: dict) -> None:
        tokens = state["tokens"]
        if tokens is not None and len(tokens) > self.capacity:
            raise UsageError(
                f"ShuffleBuffer state holds {len(tokens)} tokens, more than capacity {self.capacity}"
            )
        self.generator.set_state(state["generator"])
        device = (
            self.storage.device if self.storage is not None else "cpu"
        )  # keep the device we were moved to
        self.size, self.storage = 0, None
        if tokens is not None and len(tokens):
            self.storage = tokens.new_empty((self.capacity, tokens.shape[-1]), device=device)
            self.storage[: len(tokens)] = tokens.to(device)
            self.size = len(tokens)


class ActivationSource:
    """Turns a device batch into the activations of its real tokens, mixing them through a buffer when training.

    Args:
        harvester: the frozen LM hooked at the layer; ``None`` when batches already hold activations (a cache).
        buffer: optional shuffling buffer between harvesting and the coders (training only).
    """

    def __init__(self, harvester: Harvester | None = None, buffer: ShuffleBuffer | None = None) -> None:
        self.harvester = harvester
        self.buffer = buffer

    @property
    def tokenizer(self) -> Any:
        """The LM's tokenizer (``None`` without an LM)."""
        return None if self.harvester is None else self.harvester.tokenizer

    def to(self, device: str | torch.device) -> ActivationSource:
        """Move the LM to ``device``; returns self."""
        if self.harvester is not None:
            self.harvester.to(device)
        return self

    def activations(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(acts (…, d), mask (…)) of a batch: harvested from tokens, or read as they are from a cache."""
        if "acts" in batch:
            return batch["acts"], batch["mask"].bool()
        if self.harvester is None:
            raise UsageError(
                "batches hold tokens but no language model was loaded to harvest activations from"
            )
        return self.harvester(batch["input_ids"], batch["attention_mask"])

    def __call__(self, batch: dict[str, Tensor], *, training: bool) -> dict[str, Tensor]:
        """``{"acts": (N, d)}``: the real tokens of ``batch`` (training: mixed through the buffer, if any)."""
        acts, mask = self.activations(batch)
        if training and self.buffer is not None:
            tokens = self.mix(acts, mask)
        else:
            tokens = acts[mask]
        return {"acts": tokens}

    def mix(self, acts: Tensor, mask: Tensor) -> Tensor:
        """Push a batch's real tokens into the shuffling buffer and draw as many random ones back.

        While the buffer is below half its capacity it keeps half of what comes in, so it fills over the first
        steps and then holds a steady reserve of tokens from many earlier sequences.
        """
        assert self.buffer is not None
        before = len(self.buffer)
        self.buffer.push(acts, mask)
        pushed = len(self.buffer) - before
        if pushed == 0:
            raise TrainingError(
                "a training batch has no real tokens to train on (all padding or special tokens)"
            )
        warm = len(self.buffer) >= self.buffer.capacity // 2
        return self.buffer.pop(pushed if warm else max(1, pushed // 2))

    def state_dict(self) -> dict[str, Any]:
        return {} if self.buffer is None else {"shuffle_buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.buffer is not None and "shuffle_buffer" in state:
            self.buffer.load_state_dict(state["shuffle_buffer"])


class SourcedDataModule(L.LightningDataModule):
    """A data module whose batches become activations on the device through its :class:`ActivationSource`."""

    def __init__(self, activations: ActivationSource | None = None) -> None:
        super().__init__()
        self.activations = activations or ActivationSource()

    def setup(self, stage: str | None = None) -> None:
        if self.trainer is not None:
            self.activations.to(self.trainer.strategy.root_device)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> dict[str, Tensor]:
        training = self.trainer is not None and self.trainer.training
        return self.activations(batch, training=training)

    def state_dict(self) -> dict[str, Any]:
        return self.activations.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.activations.load_state_dict(state_dict)
