"""Reading an activation cache written by ``bilae-cache``: metadata, shards, shuffled resumable batches.

Layout of a cache directory (see :mod:`bilae.cache_writer`): ``meta.json`` plus ``train/`` and ``val/`` shards of
the real tokens' activations with their token ids, sequences, positions and source windows.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from bilae.data import distributed_rank
from bilae.errors import DataError, UsageError
from bilae.source import ActivationSource, SourcedDataModule

FORMAT, VERSION, META_FILE = "bilae-activation-cache", 1, "meta.json"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
SPLITS = ("train", "val")


def read_meta(directory: str | Path) -> dict[str, Any]:
    """The metadata of a finished cache, checked; errors name the file that is missing or broken."""
    path = Path(directory).expanduser() / META_FILE
    if not path.parent.is_dir():
        raise DataError(f"activation cache directory {path.parent} does not exist; build it with bilae-cache")
    if not path.is_file():
        raise DataError(
            f"{path} is missing: {path.parent} is not an activation cache, or its harvest did not finish"
        )
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"activation cache metadata {path} is not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{path} is not the metadata of a bilae activation cache (format {FORMAT!r})")
    if meta.get("version") != VERSION:
        raise DataError(f"{path} has cache format version {meta.get('version')}; this bilae reads {VERSION}")
    check_meta_fields(meta, path)
    if not meta["splits"]["train"]["n_tokens"]:
        raise DataError(f"activation cache {path.parent} holds no training tokens")
    return meta


def check_meta_fields(meta: dict[str, Any], path: Path) -> None:
    """The fields training reads, with the right types; the error names the first that is missing or wrong."""
    for key, kind in (("model", str), ("layer", int), ("d_model", int), ("dtype", str), ("splits", dict)):
        if not isinstance(meta.get(key), kind):
            raise DataError(
                f"{path} has no valid {key!r} (got {meta.get(key)!r}); rebuild the cache with bilae-cache"
            )
    if meta["dtype"] not in DTYPES:
        raise DataError(f"{path} stores dtype {meta['dtype']!r}; supported: {', '.join(DTYPES)}")
    train = meta["splits"].get("train")
    if not isinstance(train, dict) or not isinstance(train.get("n_tokens"), int):
        raise DataError(f"{path} has no 'train' split in its 'splits'; rebuild the cache with bilae-cache")


def shard_paths(directory: str | Path, meta: dict[str, Any], split: str) -> list[tuple[Path, int]]:
    """``(path, n_tokens)`` of each shard of ``split``, every header opened and checked against ``meta``."""
    shards = []
    for entry in meta["splits"].get(split, {}).get("shards", []):
        path = Path(directory).expanduser() / entry["file"]
        check_shard(path, entry["n_tokens"], meta["d_model"])
        shards.append((path, entry["n_tokens"]))
    return shards


def check_shard(path: Path, n_tokens: int, d_model: int) -> None:
    if not path.is_file():
        raise DataError(f"activation cache shard {path} is missing")
    try:
        with safe_open(str(path), framework="pt") as handle:
            shape = handle.get_slice("acts").get_shape()
    except (SafetensorError, OSError, KeyError) as err:
        raise DataError(f"activation cache shard {path} is corrupt ({err})") from None
    if list(shape) != [n_tokens, d_model]:
        raise DataError(
            f"activation cache shard {path} holds acts of shape {shape}, meta.json says {[n_tokens, d_model]}"
        )


def load_acts(path: Path, out: Tensor) -> None:
    """Read a shard's ``acts`` into ``out`` (a view of the window being assembled)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            out.copy_(handle.get_tensor("acts"))
    except (SafetensorError, OSError, RuntimeError) as err:
        raise DataError(f"cannot read activation cache shard {path} ({err})") from None


class CachedTokens:
    """Batches of ``batch_tokens`` cached activations, shuffled across shards, sharded by rank, resumable exactly.

    An epoch permutes the shards (seeded by seed and epoch), loads them ``window_shards`` at a time and draws the
    window's tokens in a seeded random order; batch g is tokens [g·B, (g+1)·B) of that stream, so it can cross a
    window boundary, and rank r takes batches r, r+W, .... At most one window (plus the shard being read) is in
    memory. The state is (epoch, position) like :class:`~bilae.data.TokenBatches`; resuming recomputes the epoch's
    plan and loads only the window that holds the next batch. Without ``shuffle`` tokens come in stored order.
    """

    def __init__(
        self, shards: list[tuple[Path, int]], d_model: int, dtype: torch.dtype, batch_tokens: int, *,
        shuffle: bool = True, seed: int = 0, window_shards: int = 4, rank: int = 0, world_size: int = 1,
        drop_last: bool = True,
    ) -> None:  # fmt: skip
        if batch_tokens <= 0 or window_shards <= 0:
            raise UsageError(
                f"batch_tokens and window_shards must be positive, got {batch_tokens}, {window_shards}"
            )
        self.shards, self.d_model, self.dtype, self.batch_tokens = shards, d_model, dtype, batch_tokens
        self.shuffle, self.seed, self.window_shards = shuffle, seed, window_shards
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.n_tokens = sum(n for _, n in shards)
        self.epoch, self.position = 0, 0
        if len(self) == 0:
            raise DataError(
                f"{self.n_tokens} cached tokens are too few for batch_tokens {batch_tokens} on {world_size} rank(s)"
            )

    def __len__(self) -> int:
        full, rest = divmod(self.n_tokens, self.batch_tokens)
        total = full + (1 if rest and not self.drop_last else 0)
        return total // self.world_size if self.world_size > 1 or self.drop_last else total

    def plan(self, epoch: int) -> list[list[int]]:
        """The epoch's windows: lists of shard indices."""
        order = list(range(len(self.shards)))
        if self.shuffle:
            order = torch.randperm(len(order), generator=self._generator(epoch, -1)).tolist()
        return [order[i : i + self.window_shards] for i in range(0, len(order), self.window_shards)]

    def _generator(self, epoch: int, window: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1_000_033 + window + 1)

    def _window(self, epoch: int, w: int, members: list[int]) -> tuple[Tensor, Tensor]:
        sizes = [self.shards[i][1] for i in members]
        data = torch.empty(sum(sizes), self.d_model, dtype=self.dtype)
        for i, piece in zip(members, data.split(sizes)):
            load_acts(self.shards[i][0], piece)
        order = torch.randperm(len(data), generator=self._generator(epoch, w)) if self.shuffle else None
        return data, (order if order is not None else torch.arange(len(data)))

    def _chunks(self, epoch: int, start: int) -> Iterator[tuple[Tensor, Tensor]]:
        """(window data, token order) of the epoch's stream from token ``start`` on; loads windows lazily."""
        offset = 0
        for w, members in enumerate(self.plan(epoch)):
            size = sum(self.shards[i][1] for i in members)
            if offset + size > start:
                data, order = self._window(epoch, w, members)
                yield data, order[max(0, start - offset) :]
            offset += size

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        if self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0
        first = self.rank + self.position * self.world_size  # global index of the next batch of this rank
        parts: list[Tensor] = []
        have, batch = 0, first
        for data, order in self._chunks(self.epoch, first * self.batch_tokens):
            while len(order) and self.position < len(self):
                take = min(self.batch_tokens - have, len(order))
                if (batch - self.rank) % self.world_size == 0:
                    parts.append(data[order[:take]])
                order, have = order[take:], have + take
                if have == self.batch_tokens:
                    yield from self._emit(parts, batch)
                    parts, have, batch = [], 0, batch + 1
            if self.position >= len(self):
                return  # before the next window is loaded
        if parts and self.position < len(self):  # the short last batch (drop_last=False)
            yield from self._emit(parts, batch)

    def _emit(self, parts: list[Tensor], batch: int) -> Iterator[dict[str, Tensor]]:
        if (batch - self.rank) % self.world_size:
            return
        # Count the batch before handing it out: a checkpoint taken while it trains must not replay it.
        self.position += 1
        acts = parts[0] if len(parts) == 1 else torch.cat(parts)
        yield {"acts": acts, "mask": torch.ones(len(acts), dtype=torch.bool)}

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "batch_tokens": self.batch_tokens,
        }

    def load_state_dict(self, state: dict) -> None:
        if (state["seed"], state["batch_tokens"]) != (self.seed, self.batch_tokens):
            raise UsageError(
                f"resuming with data seed {self.seed} and batch_tokens {self.batch_tokens}, but the checkpoint used "
                f"seed {state['seed']} and batch_tokens {state['batch_tokens']}"
            )
        self.epoch, self.position = state["epoch"], state["position"]


def read_sample(
    directory: str | Path, meta: dict[str, Any], sequences: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The first ``sequences`` windows of the validation split (the training split without one), from the cache alone.

    Returns ``(acts (S, T, d) float32, mask (S, T) bool, input_ids (S, T) long, attention_mask (S, T) long)``: the
    cached activations at the tokens the harvester kept (``mask``; zeros elsewhere) and the full windows they come
    from, exactly what a live harvest of those windows gives (``S`` is smaller when the split holds fewer windows).

    Raises:
        DataError: a shard without windows (written by an older bilae-cache), or no window at all.
    """
    split = "val" if (meta["splits"].get("val") or {}).get("n_tokens") else "train"
    n_ctx, d_model = int(meta["n_ctx"]), int(meta["d_model"])
    acts = torch.zeros(sequences, n_ctx, d_model)
    mask = torch.zeros(sequences, n_ctx, dtype=torch.bool)
    ids = torch.zeros(sequences, n_ctx, dtype=torch.long)
    attention = torch.zeros(sequences, n_ctx, dtype=torch.long)
    found = 0
    for path, _ in shard_paths(directory, meta, split):
        with safe_open(str(path), framework="pt") as handle:
            if "windows" not in handle.keys():
                raise DataError(
                    f"activation cache shard {path} holds no token windows; rebuild the cache with bilae-cache"
                )
            sequence = handle.get_tensor("sequence")
            if len(sequence) == 0 or int(sequence.min()) >= sequences:
                break  # shards are in corpus order: the first windows are behind us
            keep = sequence < sequences
            rows, cols = sequence[keep], handle.get_tensor("position")[keep].long()
            acts[rows, cols] = handle.get_tensor("acts")[keep].float()
            mask[rows, cols] = True
            index = handle.get_tensor("window_index")
            ours = index < sequences
            ids[index[ours]] = handle.get_tensor("windows")[ours].long()
            attention[index[ours]] = handle.get_tensor("window_mask")[ours].long()
            found = max(found, int(index[ours].max()) + 1 if ours.any() else 0)
    if found == 0:
        raise DataError(f"activation cache {directory} holds no {split} windows to sample")
    return acts[:found], mask[:found], ids[:found], attention[:found]


def load_tokenizer(name: str) -> Any:
    """The tokenizer a cache was harvested with, from local files only; ``None`` when it is not available."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure means "not available here": contexts then show token ids
        return None


class CachedActivationDataModule(SourcedDataModule):
    """Activation batches ``{"acts": (n, d), "mask": (n,)}`` read from a cache written by ``bilae-cache``.

    Args:
        dir: the cache directory (holds ``meta.json``).
        batch_tokens: tokens per training batch (per rank).
        val_batch_tokens: tokens per validation batch (default: ``batch_tokens``).
        seed: seed of the shuffle (shard order and token order per window, per epoch).
        window_shards: shards loaded and mixed together at a time (memory: this many shards).
        source: always ``"cache"``; the builders read it to skip loading the LM.
        tokenizer: the LM's tokenizer, if loaded (``bilae-analyze``); training passes none, and
            :meth:`display_tokenizer` then loads the cache's own.
        activations: the activation source (no harvester; an optional shuffling buffer).
    """

    def __init__(
        self,
        dir: str,
        batch_tokens: int = 2048,
        val_batch_tokens: int | None = None,
        seed: int = 0,
        window_shards: int = 4,
        source: str = "cache",
        tokenizer: Any = None,
        activations: ActivationSource | None = None,
    ) -> None:
        super().__init__(activations)
        if source != "cache":
            raise UsageError(f"CachedActivationDataModule reads source 'cache', got {source!r}")
        self.dir, self.meta = Path(dir).expanduser(), read_meta(dir)
        self.batch_tokens, self.val_batch_tokens = batch_tokens, val_batch_tokens or batch_tokens
        self.seed, self.window_shards = seed, window_shards
        self.tokenizer, self._looked_for_tokenizer = tokenizer, False
        self.train: CachedTokens | None = None
        self.val: CachedTokens | None = None

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.train is not None:
            return
        rank, world_size = distributed_rank(self.trainer)
        d_model, dtype = self.meta["d_model"], DTYPES[self.meta["dtype"]]
        common: dict = dict(rank=rank, world_size=world_size, window_shards=self.window_shards)
        train = shard_paths(self.dir, self.meta, "train")
        self.train = CachedTokens(train, d_model, dtype, self.batch_tokens, seed=self.seed, **common)
        if val := shard_paths(self.dir, self.meta, "val"):
            n_val = sum(n for _, n in val)
            size = min(self.val_batch_tokens, max(1, n_val // world_size))
            self.val = CachedTokens(val, d_model, dtype, size, shuffle=False, drop_last=False, **common)

    def train_dataloader(self) -> CachedTokens:
        if self.train is None:
            self.setup("fit")
        assert self.train is not None
        return self.train

    def val_dataloader(self) -> CachedTokens | list:
        if self.train is None:
            self.setup("validate")
        return self.val if self.val is not None else []

    def sample_activations(self, sequences: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The analysis sample from the cache alone: ``(acts, mask, input_ids, attention_mask)`` of the first
        ``sequences`` held-out windows (see :func:`read_sample`); no loader's resumable state moves."""
        return read_sample(self.dir, self.meta, sequences)

    def display_tokenizer(self) -> Any:
        """The tokenizer that decodes the cached token ids: the one given, else the one the cache was harvested
        with (``meta.json``'s ``tokenizer``) from local files; ``None`` when neither is available."""
        if self.tokenizer is None and self.meta.get("tokenizer") and not self._looked_for_tokenizer:
            self._looked_for_tokenizer = True
            self.tokenizer = load_tokenizer(str(self.meta["tokenizer"]))
        return self.tokenizer
