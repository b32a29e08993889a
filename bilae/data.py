"""Token batches for training: validation split, DDP shards, resumable iterables and the LightningDataModule.

``ActivationDataModule`` yields token batches ``{"input_ids", "attention_mask"}``; its activation source
(:class:`~bilae.source.ActivationSource`) turns them into activations right after they reach the device, so the
LightningModule receives activations. Training iterables are stateful, so a run resumed from a mid-epoch checkpoint
continues with exactly the next batch (Lightning saves ``state_dict()`` of stateful train iterables in its
checkpoints).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import islice

import lightning as L
import torch
from torch import Tensor

from bilae.corpus import SOURCES, STREAMED, pad_windows, text_source, token_windows, tokenize_corpus
from bilae.errors import DataError, UsageError, unknown
from bilae.source import ActivationSource, SourcedDataModule

Batch = dict[str, Tensor]


# ----------------------------------------------------------------------------------------- splits and shards
def n_validation(n_sequences: int, val_sequences: int | float) -> int:
    """Number of held-out sequences: ``val_sequences`` itself (int) or that fraction of ``n_sequences`` (float)."""
    if isinstance(val_sequences, float):
        if not 0 <= val_sequences < 1:
            raise UsageError(f"val_sequences as a fraction must be in [0, 1), got {val_sequences}")
        count = round(n_sequences * val_sequences)
    else:
        count = val_sequences
    if not 0 <= count < n_sequences:
        raise DataError(
            f"the corpus is too short: cannot hold out {count} validation sequences from {n_sequences}; "
            f"valid val_sequences: 0..{n_sequences - 1} (or give more text)"
        )
    return count


def shard(indices: Tensor, rank: int, world_size: int) -> Tensor:
    """This rank's share of ``indices``: every ``world_size``-th, trimmed so all ranks get the same count.

    Equal counts matter under DDP: a rank with an extra batch would wait forever for the others' gradients.
    """
    if not 0 <= rank < world_size:
        raise UsageError(
            f"rank {rank} is out of range for world_size {world_size}; valid 0..{world_size - 1}"
        )
    per_rank = len(indices) // world_size
    return indices[rank::world_size][:per_rank]


def distributed_rank(trainer: L.Trainer | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` from the trainer, else from torch.distributed, else ``(0, 1)``."""
    if trainer is not None:
        return trainer.global_rank, trainer.world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


# ------------------------------------------------------------------------------------------------ iterables
class TokenBatches:
    """Batches of in-memory token windows, reshuffled each epoch, sharded by rank, resumable exactly.

    Training drops the last incomplete batch (``drop_last``) so all batches have one shape; validation keeps it.
    The state is (epoch, position): the epoch seeds the shuffle, the position counts batches already handed out.
    Lightning saves ``state_dict()`` with each checkpoint and calls ``load_state_dict()`` before ``iter()`` on
    resume, so iteration continues with the next unseen batch. It has a length, which keeps Lightning from
    prefetching a batch ahead (a prefetched batch would count as seen).
    """

    def __init__(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
    ) -> None:
        if batch_size <= 0:
            raise UsageError(f"batch_size must be positive, got {batch_size}")
        self.input_ids, self.attention_mask = input_ids, attention_mask
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch, self.position = 0, 0
        if len(self) == 0:
            raise DataError(
                f"{len(input_ids)} sequences are too few for batch_size {batch_size} on {world_size} rank(s)"
            )

    def __len__(self) -> int:
        # Training drops the incomplete batch so every batch has the same shape; validation keeps it.
        per_rank = len(self.input_ids) // self.world_size
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def order(self, epoch: int) -> Tensor:
        """This rank's sequence order in ``epoch``."""
        n = len(self.input_ids)
        if not self.shuffle:
            return shard(torch.arange(n), self.rank, self.world_size)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return shard(torch.randperm(n, generator=generator), self.rank, self.world_size)

    def __iter__(self) -> Iterator[Batch]:
        if self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0
        order = self.order(self.epoch)
        while self.position < len(self):
            rows = order[self.position * self.batch_size : (self.position + 1) * self.batch_size]
            # Count the batch before handing it out: a checkpoint taken while it trains must not replay it.
            self.position += 1
            yield {"input_ids": self.input_ids[rows], "attention_mask": self.attention_mask[rows]}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise UsageError(f"resuming with data seed {self.seed} but the checkpoint used {state['seed']}")
        self.epoch, self.position = state["epoch"], state["position"]


class StreamBatches:
    """Batches of windows tokenised on the fly from a streamed source; resumable by skipping what was seen.

    Windows are dealt round-robin to ranks after the first ``skip`` (held out for validation). ``length`` is the
    number of batches in an "epoch"; Lightning needs a length to checkpoint without prefetching, so make it at
    least ``max_steps``. Resuming re-tokenises the skipped text (cheap next to the LM forward passes).
    """

    def __init__(
        self, texts: Callable[[], Iterable[str]], tokenizer, n_ctx: int, batch_size: int, *, length: int,
        skip: int = 0, rank: int = 0, world_size: int = 1,
    ) -> None:  # fmt: skip
        self.texts, self.tokenizer, self.n_ctx, self.batch_size = texts, tokenizer, n_ctx, batch_size
        self.length, self.skip, self.rank, self.world_size = length, skip, rank, world_size
        self.epoch, self.position = 0, 0

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[Batch]:
        if self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0
        windows = islice(token_windows(self.texts(), self.tokenizer, self.n_ctx), self.skip, None)
        mine = islice(windows, self.rank, None, self.world_size)
        mine = islice(mine, self.position * self.batch_size, None)
        while (
            self.position < len(self) and len(chunk := list(islice(mine, self.batch_size))) == self.batch_size
        ):
            self.position += 1
            ids, mask = pad_windows(chunk, self.n_ctx, self.tokenizer.pad_token_id)
            yield {"input_ids": ids, "attention_mask": mask}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]


# ------------------------------------------------------------------------------------------------ datamodule
class ActivationDataModule(SourcedDataModule):
    """Token batches for training an autoencoder, turned into activations on the device by ``activations``.

    The LM lives in the activation source's harvester; the data module itself needs only the tokenizer. Finite sources are tokenised once in ``setup``
    into ``n_ctx`` windows; the first held-out windows form the validation set. Streamed sources (``hf``,
    ``fineweb-edu``) are tokenised on the fly. Under DDP each rank gets a disjoint, equally sized shard.

    Args:
        tokenizer: the LM's tokenizer (needs a pad token; ``load_lm`` guarantees one).
        source: registered text source name (``pydoc``, ``files``, ``hf``, ``fineweb-edu``).
        source_kwargs: keyword arguments of the source (e.g. ``paths``, ``text_column``, ``split``).
        n_ctx: tokens per sequence, special tokens included.
        batch_size: sequences per batch (per rank).
        val_sequences: held-out sequences: a count, or a fraction of the corpus (finite sources only).
        max_sequences: cap on the sequences tokenised from a finite source (``None``: all).
        seed: seed of the per-epoch shuffle.
        stream_batches: batches per epoch of a streamed source; make it at least ``max_steps``.
        activations: the activation source (harvester and shuffling buffer); without one, batches stay tokens.
    """

    def __init__(
        self,
        tokenizer,
        source: str = "pydoc",
        source_kwargs: dict | None = None,
        n_ctx: int = 128,
        batch_size: int = 32,
        val_sequences: int | float = 0.05,
        max_sequences: int | None = None,
        seed: int = 0,
        stream_batches: int = 1_000_000,
        activations: ActivationSource | None = None,
    ) -> None:
        super().__init__(activations)
        if source not in SOURCES:
            raise unknown("text source", source, SOURCES)
        if n_ctx <= 0 or batch_size <= 0:
            raise UsageError(
                f"n_ctx and batch_size must be positive, got n_ctx={n_ctx}, batch_size={batch_size}"
            )
        if source in STREAMED and isinstance(val_sequences, float):
            raise UsageError(
                f"streamed source {source!r} needs val_sequences as a count, got {val_sequences}"
            )
        self.tokenizer, self.source, self.source_kwargs = tokenizer, source, dict(source_kwargs or {})
        self.n_ctx, self.batch_size, self.val_sequences = n_ctx, batch_size, val_sequences
        self.max_sequences, self.seed, self.stream_batches = max_sequences, seed, stream_batches
        self.train: TokenBatches | StreamBatches | None = None
        self.val: TokenBatches | None = None

    def describe_source(self) -> str:
        """The source's name and arguments, for error messages."""
        args = ", ".join(f"{k}={v!r}" for k, v in self.source_kwargs.items())
        return f"{self.source!r}" + (f" ({args})" if args else "")

    def texts(self) -> Iterator[str]:
        """A fresh iterator over the source's documents."""
        return text_source(self.source, **self.source_kwargs)

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.train is not None:  # Lightning calls setup per stage; tokenise once
            return
        rank, world_size = distributed_rank(self.trainer)
        if self.source in STREAMED:
            self._setup_stream(rank, world_size)
        else:
            self._setup_corpus(rank, world_size)

    def _setup_corpus(self, rank: int, world_size: int) -> None:
        ids, mask = tokenize_corpus(
            self.texts(), self.tokenizer, self.n_ctx, self.max_sequences, self.describe_source()
        )
        n_val = n_validation(len(ids), self.val_sequences)
        common: dict = dict(seed=self.seed, rank=rank, world_size=world_size)
        self.train = TokenBatches(ids[n_val:], mask[n_val:], self.batch_size, shuffle=True, **common)
        if n_val:
            val_batch = min(self.batch_size, max(1, n_val // world_size))
            self.val = TokenBatches(
                ids[:n_val], mask[:n_val], val_batch, shuffle=False, drop_last=False, **common
            )

    def _setup_stream(self, rank: int, world_size: int) -> None:
        n_val = int(self.val_sequences)
        if n_val:
            ids, mask = tokenize_corpus(self.texts(), self.tokenizer, self.n_ctx, n_val, self.source)
            val_batch = min(self.batch_size, max(1, n_val // world_size))
            self.val = TokenBatches(
                ids, mask, val_batch, shuffle=False, drop_last=False, rank=rank, world_size=world_size
            )
        self.train = StreamBatches(
            self.texts, self.tokenizer, self.n_ctx, self.batch_size,
            length=self.stream_batches, skip=n_val, rank=rank, world_size=world_size,
        )  # fmt: skip

    def train_dataloader(self) -> TokenBatches | StreamBatches:
        # The same object every time, so the state Lightning restores is the state that is iterated.
        if self.train is None:
            self.setup("fit")
        assert self.train is not None
        return self.train

    def val_dataloader(self) -> TokenBatches | list:
        if self.train is None:
            self.setup("validate")
        return self.val if self.val is not None else []

    def sample_tokens(self, sequences: int) -> tuple[Tensor, Tensor]:
        """The first ``sequences`` held-out sequences (training ones without a validation split), read from memory
        without advancing any loader's resumable state (the analysis sample)."""
        if self.train is None:
            self.setup("validate")
        for split in (self.val, self.train):
            if isinstance(split, TokenBatches):
                return split.input_ids[:sequences], split.attention_mask[:sequences]
        raise DataError(
            f"the analysis sample needs in-memory token sequences: streamed source {self.source!r} has no "
            "validation split; set data.val_sequences > 0"
        )
