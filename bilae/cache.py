"""``bilae-cache``: harvest a frozen LM's activations once into sharded safetensors, then train from them.

    python -m bilae.cache cache.dir=caches/minilm-l3                     # the demo model and corpus
    bilae-train data=cache data.dir=caches/minilm-l3 buffer_tokens=0     # no LM is loaded
    bilae-train -m data=cache data.dir=caches/minilm-l3 autoencoder.alpha=0,0.1,0.2   # a sweep reuses it

Layout of a cache directory (every file written atomically; ``meta.json`` last, so a directory without it is an
unfinished harvest):

- ``meta.json``: format, version, model, layer, d_model, n_ctx, dtype, tokenizer, n_tokens, shards, the harvest
  options (exclude_special, sink_factor, data config) and per split (``train``, ``val``) its shard files.
- ``train/NNNNN.safetensors``, ``val/NNNNN.safetensors``: only the tokens the harvester's mask keeps (no padding,
  no special tokens, no filtered sinks), in corpus order, ``shard_tokens`` per shard (the last one may be short):
  ``acts`` (n, d_model) in the cache dtype, ``token_ids`` (n,) int32, ``sequence`` (n,) int64 (index of the window in
  its split), ``position`` (n,) int32 (index in the window), and the full windows these tokens come from:
  ``windows`` (w, n_ctx) int32 token ids, ``window_mask`` (w, n_ctx) uint8 attention mask, ``window_index`` (w,).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from bilae.autoencoders import Autoencoder
from bilae.autoencoders.checkpoint import atomic_path, atomic_write_text
from bilae.cli import reported
from bilae.config import CONF_DIR
from bilae.data import TokenBatches, distributed_rank
from bilae.errors import CheckpointError, DataError, UsageError, unknown
from bilae.hooks import Harvester

log = logging.getLogger("bilae")

FORMAT, VERSION, META_FILE = "bilae-activation-cache", 1, "meta.json"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
SPLITS = ("train", "val")


# ----------------------------------------------------------------------------------------------- writing
class ShardWriter:
    """Collects the kept tokens of harvested batches of one split and writes them in shards of ``shard_tokens``."""

    def __init__(self, directory: Path, split: str, dtype: torch.dtype, shard_tokens: int) -> None:
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.pending: dict[str, list[Tensor]] = {k: [] for k in ("acts", "token_ids", "sequence", "position")}
        self.windows: list[tuple[Tensor, Tensor, Tensor]] = []  # (index, ids, mask) of pending windows
        self.n_pending, self.n_tokens, self.n_sequences = 0, 0, 0
        self.shards: list[dict[str, Any]] = []

    def add(
        self, acts: Tensor, mask: Tensor, input_ids: Tensor, attention_mask: Tensor, limit: int | None
    ) -> None:
        """Keep the tokens of one LM batch where ``mask`` (B, T) is True, up to ``limit`` tokens in the split."""
        rows, cols = mask.nonzero(as_tuple=True)
        if limit is not None:
            rows, cols = rows[: limit - self.n_tokens], cols[: limit - self.n_tokens]
        kept = acts[rows, cols].to("cpu", self.dtype)
        if not torch.isfinite(kept).all():
            raise DataError(
                f"activations overflow {self.dtype} (max |x| = {acts.abs().max().item():.4g}); "
                "use cache.dtype=bfloat16 or float32"
            )
        rows, cols = rows.cpu(), cols.cpu()
        index = torch.arange(self.n_sequences, self.n_sequences + len(input_ids))
        self.pending["acts"].append(kept)
        self.pending["token_ids"].append(input_ids.cpu()[rows, cols].int())
        self.pending["sequence"].append(index[rows])
        self.pending["position"].append(cols.int())
        self.windows.append((index, input_ids.cpu().int(), attention_mask.cpu().to(torch.uint8)))
        self.n_sequences += len(input_ids)
        self.n_pending += len(rows)
        self.n_tokens += len(rows)
        while self.n_pending >= self.shard_tokens:
            self.flush(self.shard_tokens)

    def flush(self, n: int) -> None:
        """Write the first ``n`` pending tokens (and the windows they come from) as the next shard."""
        tensors = {k: torch.cat(v) for k, v in self.pending.items()}
        index, ids, attention = (torch.cat(parts) for parts in zip(*self.windows))
        shard = {k: v[:n].contiguous() for k, v in tensors.items()}
        used = torch.isin(index, shard["sequence"])
        shard |= {"windows": ids[used], "window_mask": attention[used], "window_index": index[used]}
        name = f"{self.split}/{len(self.shards):05d}.safetensors"
        with atomic_path(self.directory / name) as tmp:
            save_file(shard, str(tmp), metadata={"format": FORMAT})
        self.shards.append({"file": name, "n_tokens": n})
        self.pending = {k: [v[n:]] for k, v in tensors.items()}
        keep = torch.isin(index, self.pending["sequence"][0])  # windows that still have pending tokens
        self.windows = [(index[keep], ids[keep], attention[keep])]
        self.n_pending -= n

    def close(self) -> dict[str, Any]:
        if self.n_pending:
            self.flush(self.n_pending)
        return {"n_tokens": self.n_tokens, "n_sequences": self.n_sequences, "shards": self.shards}


def harvest_split(
    harvester: Harvester,
    batches: Iterable[dict[str, Tensor]],
    writer: ShardWriter,
    limit: int | None,
    total: int,
) -> dict[str, Any]:
    """Harvest ``batches`` (at most ``total``) into ``writer``, stopping once ``limit`` tokens are kept."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    device = harvester.device
    with tqdm(total=total, desc=f"harvest {writer.split}", unit="batch", file=sys.stderr) as bar:
        for batch in islice(batches, total):
            ids, attention = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            acts, mask = harvester(ids, attention)
            writer.add(acts, mask, ids, attention, limit)
            bar.update()
            bar.set_postfix(tokens=writer.n_tokens, refresh=False)
            if limit is not None and writer.n_tokens >= limit:
                break
    summary = writer.close()
    seconds = time.perf_counter() - start
    log.info(
        "%s: %d tokens from %d sequences in %d shard(s), %.1f s (%.0f tokens/s)",
        writer.split, summary["n_tokens"], summary["n_sequences"], len(summary["shards"]),
        seconds, summary["n_tokens"] / max(seconds, 1e-9),
    )  # fmt: skip
    return summary


def split_batches(cfg: DictConfig, tokenizer: Any) -> dict[str, Any]:
    """The token batches of each split, in corpus order: the data group's windows, unshuffled, none dropped."""
    from bilae.train import build_datamodule

    datamodule = build_datamodule(cfg, tokenizer)
    datamodule.setup("fit")
    train = datamodule.train  # type: ignore[attr-defined]
    if isinstance(train, TokenBatches):
        train = TokenBatches(
            train.input_ids, train.attention_mask, train.batch_size, shuffle=False, drop_last=False
        )
    elif cfg.cache.tokens is None and cfg.cache.batches is None:
        raise UsageError(f"data source {cfg.data.source!r} is streamed: set cache.tokens or cache.batches")
    return {"train": train, "val": datamodule.val}  # type: ignore[attr-defined]


def build_cache(cfg: DictConfig) -> dict[str, Any]:
    """Harvest the ``model``/``data`` of ``cfg`` into ``cfg.cache.dir``; returns the metadata written."""
    from bilae.train import build_harvester

    options = cfg.cache
    if cfg.data.get("source") == "cache":
        raise UsageError(
            "data=cache reads a cache; to build one, pick a text corpus (data=pydoc, files, ...)"
        )
    if options.dtype not in DTYPES:
        raise unknown("cache dtype", options.dtype, DTYPES)
    if options.shard_tokens <= 0:
        raise UsageError(f"cache.shard_tokens must be positive, got {options.shard_tokens}")
    directory = prepare_directory(Path(options.dir).expanduser(), options.overwrite)
    L.seed_everything(cfg.seed)
    harvester = build_harvester(cfg.model).to(options.device)
    splits = split_batches(cfg, harvester.tokenizer)
    summaries = {}
    for split, batches in splits.items():
        limit = options.tokens if split == "train" else None
        total = options.batches if split == "train" and options.batches is not None else None
        total = min(total or len(batches or []), len(batches or []))
        writer = ShardWriter(directory, split, DTYPES[options.dtype], options.shard_tokens)
        summaries[split] = harvest_split(harvester, batches or [], writer, limit, total)
    if summaries["train"]["n_tokens"] == 0:
        raise DataError(f"the harvest kept no training tokens (data {cfg.data.source!r}); nothing was cached")
    meta = {
        "format": FORMAT, "version": VERSION, "model": cfg.model.name, "layer": harvester.layer,
        "d_model": harvester.d_model, "n_ctx": cfg.data.n_ctx, "dtype": options.dtype,
        "tokenizer": getattr(harvester.tokenizer, "name_or_path", type(harvester.tokenizer).__name__),
        "n_tokens": sum(s["n_tokens"] for s in summaries.values()),
        "shards": sum(len(s["shards"]) for s in summaries.values()),
        "exclude_special": harvester.exclude_special, "sink_factor": harvester.sink_factor,
        "model_config": OmegaConf.to_container(cfg.model, resolve=True),
        "data_config": OmegaConf.to_container(cfg.data, resolve=True),
        "splits": summaries,
    }  # fmt: skip
    atomic_write_text(directory / META_FILE, json.dumps(meta, indent=2) + "\n")
    log.info(
        "activation cache written: %s (%d tokens, %d shards)", directory, meta["n_tokens"], meta["shards"]
    )
    return meta


def prepare_directory(directory: Path, overwrite: bool) -> Path:
    """Refuse to clobber a finished cache unless ``overwrite``; then drop its metadata first, then its shards."""
    if (directory / META_FILE).exists():
        if not overwrite:
            raise UsageError(
                f"{directory} already holds an activation cache; pass cache.overwrite=true to replace it"
            )
        (
            directory / META_FILE
        ).unlink()  # first: a crash from here on leaves an unfinished cache, never a mixed one
    for split in SPLITS:
        for old in (directory / split).glob("*.safetensors"):
            old.unlink()
    directory.mkdir(parents=True, exist_ok=True)
    return directory


# ----------------------------------------------------------------------------------------------- reading
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
    if not meta["splits"]["train"]["n_tokens"]:
        raise DataError(f"activation cache {path.parent} holds no training tokens")
    return meta


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


class CachedActivationDataModule(L.LightningDataModule):
    """Activation batches ``{"acts": (n, d), "mask": (n,)}`` read from a cache written by ``bilae-cache``.

    Args:
        dir: the cache directory (holds ``meta.json``).
        batch_tokens: tokens per training batch (per rank).
        val_batch_tokens: tokens per validation batch (default: ``batch_tokens``).
        seed: seed of the shuffle (shard order and token order per window, per epoch).
        window_shards: shards loaded and mixed together at a time (memory: this many shards).
        source: always ``"cache"``; ``bilae.train.build`` reads it to skip loading the LM.
        tokenizer: ignored (accepted so training builds every data module the same way).
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
    ) -> None:
        super().__init__()
        if source != "cache":
            raise UsageError(f"CachedActivationDataModule reads source 'cache', got {source!r}")
        self.dir, self.meta = Path(dir).expanduser(), read_meta(dir)
        self.batch_tokens, self.val_batch_tokens = batch_tokens, val_batch_tokens or batch_tokens
        self.seed, self.window_shards = seed, window_shards
        self.train: CachedTokens | None = None
        self.val: CachedTokens | None = None

    def setup(self, stage: str | None = None) -> None:
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


# ------------------------------------------------------------------------------------------- training wiring
def coders_for_cache(cfg: DictConfig) -> list[Autoencoder]:
    """The autoencoders of a run that trains from ``cfg.data.dir``, checked against the cache's model and layer."""
    from bilae.train import build_coders

    meta = read_meta(cfg.data.dir)
    where = Path(cfg.data.dir) / META_FILE
    if (cfg.model.name, cfg.model.layer) != (meta["model"], meta["layer"]):
        raise UsageError(
            f"the cache {where} was harvested from model {meta['model']!r} at layer {meta['layer']}, but the config "
            f"asks for model {cfg.model.name!r} at layer {cfg.model.layer}; set model.name={meta['model']} "
            f"model.layer={meta['layer']} (or the matching model=... option)"
        )
    if not cfg.get("init_from"):
        return build_coders(cfg, meta["d_model"])
    coder = Autoencoder.load(cfg.init_from)
    if (coder.config.d_model, coder.config.layer) != (meta["d_model"], meta["layer"]):
        raise CheckpointError(
            f"autoencoder {cfg.init_from} has d_model {coder.config.d_model} and layer {coder.config.layer}, but "
            f"the cache {where} holds d_model {meta['d_model']} at layer {meta['layer']}"
        )
    return [coder]


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="cache")
def _main(cfg: DictConfig) -> None:
    with reported("bilae-cache"):
        build_cache(cfg)


def main() -> None:
    """Console script ``bilae-cache``."""
    with reported("bilae-cache"):
        _main()


if __name__ == "__main__":
    main()
