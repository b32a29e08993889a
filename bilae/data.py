"""Text in, token batches out: sources, tokenisation into windows, validation split, DDP shards, shuffling.

Registered text sources (``text_source(name, **kwargs)``):
- ``pydoc``: the standard library's ``pydoc_data.topics`` (~465k characters, ~128k MiniLM tokens), offline.
- ``files``: local ``.txt``/``.md`` (one document per file), ``.jsonl`` and ``.parquet`` (one per row) by glob.
- ``hf``: any Hugging Face dataset through ``datasets.load_dataset`` (streamed by default).
- ``fineweb-edu``: ``HuggingFaceFW/fineweb-edu``, config ``sample-10BT``, streamed (the paper's corpus).

``ActivationDataModule`` yields *token* batches ``{"input_ids", "attention_mask"}``; the LightningModule harvests
activations from them with the frozen LM (``bilae.hooks.Harvester``) and may mix tokens across sequences with a
``ShuffleBuffer``. Training iterables are stateful, so a run resumed from a mid-epoch checkpoint continues with
exactly the next batch (Lightning saves ``state_dict()`` of stateful train iterables in its checkpoints).
"""

from __future__ import annotations

import glob
import json
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from itertools import islice
from pathlib import Path

import lightning as L
import torch
from torch import Tensor

from bilae.errors import DataError, UsageError, unknown

Batch = dict[str, Tensor]


# ---------------------------------------------------------------------------------------------------- sources
def pydoc_texts() -> Iterator[str]:
    """Documents of Python's built-in help topics, in a fixed (sorted) order."""
    from pydoc_data.topics import topics

    return (topics[key] for key in sorted(topics))


def file_texts(paths: str | list[str], text_column: str = "text") -> Iterator[str]:
    """Documents from local files matching glob pattern(s): whole ``.txt``/``.md`` files, ``.jsonl``/``.parquet`` rows."""
    patterns = [paths] if isinstance(paths, str) else list(paths)
    files = sorted({f for p in patterns for f in glob.glob(str(Path(p).expanduser()), recursive=True)})
    if not files:
        raise DataError(f"no files match {patterns}")
    for file in files:
        yield from _read_file(Path(file), text_column)


def _read_file(file: Path, text_column: str) -> Iterator[str]:
    if file.suffix in (".txt", ".md"):
        yield file.read_text(encoding="utf-8")
    elif file.suffix == ".jsonl":
        with file.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if line.strip():
                    yield _column(json.loads(line), text_column, f"{file}:{number}")
    elif file.suffix == ".parquet":
        import pyarrow.parquet as pq  # a dependency of datasets

        table = pq.read_table(file)
        if text_column not in table.column_names:
            raise DataError(f"{file} has no column {text_column!r}; columns: {table.column_names}")
        yield from table.column(text_column).to_pylist()
    else:
        raise UsageError(
            f"cannot read {file}: unknown extension {file.suffix!r}; valid: .txt, .md, .jsonl, .parquet"
        )


def _column(row: dict, text_column: str, where: str) -> str:
    if text_column not in row:
        raise DataError(f"{where} has no field {text_column!r}; fields: {sorted(row)}")
    return row[text_column]


def hf_texts(
    path: str,
    name: str | None = None,
    split: str = "train",
    *,
    streaming: bool = True,
    text_column: str = "text",
    revision: str | None = None,
    **kwargs,
) -> Iterator[str]:
    """Documents of a Hugging Face dataset (``datasets.load_dataset``), streamed by default."""
    import datasets

    try:
        dataset = datasets.load_dataset(
            path, name, split=split, streaming=streaming, revision=revision, **kwargs
        )
    except (OSError, ConnectionError, ValueError) as err:
        raise DataError(
            f"could not load dataset {path!r} (config {name!r}, split {split!r}): {err}"
        ) from None
    return (_column(row, text_column, f"dataset {path!r}") for row in dataset)


SOURCES: dict[str, Callable[..., Iterator[str]]] = {
    "pydoc": pydoc_texts,
    "files": file_texts,
    "hf": hf_texts,
    "fineweb-edu": partial(hf_texts, "HuggingFaceFW/fineweb-edu", "sample-10BT"),
}
STREAMED = {"hf", "fineweb-edu"}


def text_source(name: str, **kwargs) -> Iterator[str]:
    """Documents of the registered source ``name`` (see the module docstring); kwargs go to the source."""
    if name not in SOURCES:
        raise unknown("text source", name, SOURCES)
    return SOURCES[name](**kwargs)


# ---------------------------------------------------------------------------------------------- tokenisation
def special_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text (BERT: [CLS] and [SEP]; Qwen3: none)."""
    probe = "hello world"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    raise UsageError(
        f"cannot tell where {type(tokenizer).__name__} puts its special tokens: {full} vs {plain}"
    )


def token_windows(
    texts: Iterable[str], tokenizer, n_ctx: int, docs_per_call: int = 64
) -> Iterator[list[int]]:
    """Chunk every document into consecutive windows of at most ``n_ctx`` tokens, special tokens included.

    Long documents become several windows instead of being truncated, so small corpora are not wasted; each
    window gets the model's own special tokens (e.g. BERT's [CLS] ... [SEP]).
    """
    prefix, suffix = special_affixes(tokenizer)
    body = n_ctx - len(prefix) - len(suffix)
    if body <= 0:
        raise UsageError(
            f"n_ctx must exceed the tokenizer's {len(prefix) + len(suffix)} special tokens per window; got {n_ctx}"
        )
    texts = iter(texts)
    while chunk := list(islice(texts, docs_per_call)):
        # verbose=False: documents longer than the model's max length are fine here, they are chunked below.
        for ids in tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]:
            for start in range(0, len(ids), body):
                yield prefix + ids[start : start + body] + suffix


def pad_windows(windows: list[list[int]], n_ctx: int, pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad windows into ``(input_ids, attention_mask)``, both (N, n_ctx) long."""
    ids = torch.full((len(windows), n_ctx), pad_id, dtype=torch.long)
    mask = torch.zeros((len(windows), n_ctx), dtype=torch.long)
    for row, window in enumerate(windows):
        ids[row, : len(window)] = torch.tensor(window, dtype=torch.long)
        mask[row, : len(window)] = 1
    return ids, mask


def tokenize_corpus(
    texts: Iterable[str], tokenizer, n_ctx: int, max_sequences: int | None = None, source: str = "corpus"
) -> tuple[Tensor, Tensor]:
    """Tokenise a whole (finite) corpus into padded windows; raises DataError naming ``source`` if it is empty."""
    windows = list(islice(token_windows(texts, tokenizer, n_ctx), max_sequences))
    if not windows:
        raise DataError(
            f"the corpus is empty: text source {source} yielded no tokens; point it at files with text"
        )
    return pad_windows(windows, n_ctx, tokenizer.pad_token_id)


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


# ------------------------------------------------------------------------------------------- shuffle buffer
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
        stored = None if self.storage is None else self.storage[: self.size].cpu()
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


# ------------------------------------------------------------------------------------------------ datamodule
class ActivationDataModule(L.LightningDataModule):
    """Token batches for training an autoencoder; the LightningModule turns them into activations.

    Holds no LM, only its tokenizer (from ``bilae.lm.load_lm``). Finite sources are tokenised once in ``setup``
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
    ) -> None:
        super().__init__()
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
