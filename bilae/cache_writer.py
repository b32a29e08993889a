"""Writing an activation cache (``bilae-cache``): harvest a frozen LM's activations once into sharded safetensors.

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
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable
from itertools import islice
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file
from torch import Tensor

from bilae.autoencoders.checkpoint import atomic_path, atomic_write_text
from bilae.builders import build_datamodule, build_harvester
from bilae.cache_reader import DTYPES, FORMAT, META_FILE, SPLITS, VERSION
from bilae.data import TokenBatches
from bilae.errors import DataError, UsageError, unknown
from bilae.hooks import Harvester
from bilae.validation import check_cache

log = logging.getLogger("bilae")


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
    """Harvest the ``model``/``data`` of ``cfg`` into ``cfg.cache.dir``; returns the metadata written.

    Everything is checked before anything is loaded or written; the cache is harvested into a staging directory
    beside the target and moved into place only once complete, so a failed command leaves an existing cache (and
    every file bilae did not write) byte-identical.
    """
    directory = check_cache_options(cfg)
    L.seed_everything(cfg.seed)
    harvester = build_harvester(cfg.model).to(cfg.cache.device)
    splits = split_batches(cfg, harvester.tokenizer)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.partial-", dir=directory.parent))
    try:
        meta = harvest_into(cfg, harvester, splits, staging)
        swap_into_place(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # only ever bilae's own staging directory
    log.info(
        "activation cache written: %s (%d tokens, %d shards)", directory, meta["n_tokens"], meta["shards"]
    )
    return meta


def check_cache_options(cfg: DictConfig) -> Path:
    """The cache directory, after every ``cache.*`` option and the target directory were checked."""
    check_cache(cfg)
    options = cfg.cache
    if OmegaConf.is_missing(options, "dir"):
        raise UsageError("bilae-cache needs cache.dir=<directory>: where to write the activation cache")
    if cfg.data.get("source") == "cache":
        raise UsageError(
            "data=cache reads a cache; to build one, pick a text corpus (data=pydoc, files, ...)"
        )
    if options.dtype not in DTYPES:
        raise unknown("cache dtype", options.dtype, DTYPES)
    for key in ("tokens", "batches", "shard_tokens"):
        value = options.get(key)
        if value is None and key != "shard_tokens":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            valid = "a positive integer" + ("" if key == "shard_tokens" else " or null")
            raise UsageError(f"cache.{key} must be {valid}, got {value!r}")
    if not isinstance(options.overwrite, bool):
        raise UsageError(f"cache.overwrite must be true or false, got {options.overwrite!r}")
    directory = Path(str(options.dir)).expanduser()
    if directory.exists() and not directory.is_dir():
        raise UsageError(
            f"cache.dir {directory} is a file; give a new or empty directory (or an existing cache)"
        )
    if is_cache(directory):
        if not options.overwrite:
            raise UsageError(
                f"{directory} already holds an activation cache; pass cache.overwrite=true to replace it"
            )
    elif directory.is_dir() and any(directory.iterdir()):
        held = sorted(p.name for p in directory.iterdir())[:5]
        raise UsageError(
            f"cache.dir {directory} is not empty and not an activation cache (it holds {held}); "
            "bilae never deletes what it did not write: choose a new or empty directory"
        )
    return directory


def is_cache(directory: Path) -> bool:
    """Whether ``directory`` holds a finished bilae activation cache (its meta.json says so)."""
    try:
        return json.loads((directory / META_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def harvest_into(
    cfg: DictConfig, harvester: Harvester, splits: dict[str, Any], directory: Path
) -> dict[str, Any]:
    """Harvest every split into ``directory`` and write its ``meta.json`` last; returns the metadata."""
    options = cfg.cache
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
    return meta


def swap_into_place(staging: Path, directory: Path) -> None:
    """Move the finished cache in ``staging`` to ``directory``, replacing only the files of an old cache there.

    The old ``meta.json`` goes first (from then on the directory reads as an unfinished harvest, never as a mix of
    two caches), then the new shards replace or join the old ones, the old cache's other shards are removed, and
    the new ``meta.json`` comes last. Files bilae did not write are never touched.
    """
    old_shards = set(listed_shards(directory)) if is_cache(directory) else set()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / META_FILE).unlink(missing_ok=True)
    new_shards = listed_shards(staging)
    for name in new_shards:
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / name, directory / name)
    for name in old_shards - set(new_shards):
        (directory / name).unlink(missing_ok=True)
    os.replace(staging / META_FILE, directory / META_FILE)


def listed_shards(directory: Path) -> list[str]:
    """The shard files (relative paths) a cache's meta.json lists; each must stay inside its split folder."""
    meta = json.loads((directory / META_FILE).read_text())
    names = [entry["file"] for split in SPLITS for entry in meta["splits"].get(split, {}).get("shards", [])]
    for name in names:
        parts = Path(name).parts
        if len(parts) != 2 or parts[0] not in SPLITS or not parts[1].endswith(".safetensors"):
            raise DataError(f"{directory / META_FILE} lists a shard outside its split folders: {name!r}")
    return names
