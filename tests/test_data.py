"""Text sources, windows, splits and shards, exact resumption, the shuffle buffer, the datamodule."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from lightning.fabric.utilities.data import sized_len
from lightning.fabric.utilities.types import _Stateful
from lightning.pytorch.utilities import CombinedLoader

import bilae.corpus as corpus
from bilae.corpus import text_source, token_windows, tokenize_corpus
from bilae.data import ActivationDataModule, StreamBatches, TokenBatches, n_validation, shard
from bilae.errors import DataError, UsageError
from bilae.source import ShuffleBuffer

CPU = SimpleNamespace(root_device=torch.device("cpu"))
DOCS = [
    f"Document number {i} says: " + " ".join(f"word{j}" for j in range(i * 7 % 40 + 1)) for i in range(30)
]


@pytest.fixture(scope="module")
def tokenizer(minilm):  # noqa: F811
    return minilm[1]


def take(iterable, n):
    # range first: zip stops on it before pulling (and so counting) one batch too many.
    return [b["input_ids"] for _, b in zip(range(n), iterable)]


# ------------------------------------------------------------------ sources
def test_pydoc_is_a_large_deterministic_offline_corpus():
    docs = list(text_source("pydoc"))
    assert len(docs) > 50 and sum(map(len, docs)) > 400_000
    assert docs == list(text_source("pydoc"))


def test_local_files_txt_jsonl_parquet(tmp_path):
    (tmp_path / "a.txt").write_text("plain text")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"body": "row one"}) + "\n\n" + json.dumps({"body": "row two"}) + "\n"
    )
    pq.write_table(pa.table({"body": ["pq one", "pq two"]}), tmp_path / "c.parquet")
    assert list(text_source("files", paths=str(tmp_path / "*.txt"))) == ["plain text"]
    got = list(
        text_source(
            "files", paths=[str(tmp_path / "*.jsonl"), str(tmp_path / "*.parquet")], text_column="body"
        )
    )
    assert got == ["row one", "row two", "pq one", "pq two"]


def test_local_file_errors(tmp_path):
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    (tmp_path / "d.csv").write_text("x")
    with pytest.raises(DataError, match="matches no files"):
        list(text_source("files", paths=str(tmp_path / "*.nothing")))
    with pytest.raises(DataError, match=r"b.jsonl:1 has no field 'text'; fields: \['body'\]"):
        list(text_source("files", paths=str(tmp_path / "b.jsonl")))
    with pytest.raises(UsageError, match=r"unknown extension '.csv'"):
        list(text_source("files", paths=str(tmp_path / "d.csv")))


def test_unknown_source_lists_valid_ones():
    with pytest.raises(UsageError, match="unknown text source 'wiki'.*'fineweb-edu'.*'pydoc'"):
        text_source("wiki")


def test_fineweb_edu_streams_sample_10bt(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return iter([{"text": "first"}, {"text": "second"}])

    monkeypatch.setattr("datasets.load_dataset", fake_load_dataset)
    assert list(text_source("fineweb-edu")) == ["first", "second"]
    assert calls == [
        ("HuggingFaceFW/fineweb-edu", "sample-10BT", {"split": "train", "streaming": True, "revision": None})
    ]


# --------------------------------------------------------------- windows
def test_windows_chunk_documents_without_losing_tokens(tokenizer):
    windows = list(token_windows(DOCS, tokenizer, n_ctx=16))
    assert all(
        len(w) <= 16 and w[0] == tokenizer.cls_token_id and w[-1] == tokenizer.sep_token_id for w in windows
    )
    bodies = [t for w in windows for t in w[1:-1]]
    assert bodies == [t for d in DOCS for t in tokenizer(d, add_special_tokens=False)["input_ids"]]
    assert len(windows) > len(DOCS)  # long documents were split, not truncated


def test_tokenize_corpus_pads_and_caps(tokenizer):
    ids, mask = tokenize_corpus(DOCS, tokenizer, n_ctx=16, max_sequences=5)
    assert ids.shape == mask.shape == (5, 16) and ids.dtype == mask.dtype == torch.long
    assert torch.equal(ids == tokenizer.pad_token_id, mask == 0)


@pytest.mark.parametrize("n_ctx", [0, -3, 2])
def test_n_ctx_too_small(tokenizer, n_ctx):
    with pytest.raises(UsageError, match=f"n_ctx must exceed the tokenizer's 2 special tokens.*got {n_ctx}"):
        list(token_windows(DOCS, tokenizer, n_ctx))


def test_empty_corpus_names_the_source(tokenizer):
    with pytest.raises(DataError, match="corpus is empty: text source 'files' yielded no tokens"):
        tokenize_corpus(["", ""], tokenizer, 16, source="'files'")


# -------------------------------------------------------- splits, shards
def test_n_validation():
    assert n_validation(100, 0.05) == 5 and n_validation(100, 7) == 7 and n_validation(100, 0) == 0
    with pytest.raises(
        DataError, match="corpus is too short: cannot hold out 100 validation sequences from 100"
    ):
        n_validation(100, 100)
    with pytest.raises(UsageError, match=r"fraction must be in \[0, 1\), got 1.5"):
        n_validation(100, 1.5)


@pytest.mark.parametrize("n, world_size", [(10, 1), (10, 3), (7, 2), (64, 8)])
def test_shards_are_disjoint_and_equal(n, world_size):
    shards = [shard(torch.arange(n), rank, world_size) for rank in range(world_size)]
    assert {len(s) for s in shards} == {n // world_size}
    assert len(set(torch.cat(shards).tolist())) == world_size * (n // world_size)
    with pytest.raises(UsageError, match="rank 3 is out of range for world_size 3"):
        shard(torch.arange(n), 3, 3)


# ---------------------------------------------------- resumable iterables
def make_batches(**kwargs) -> TokenBatches:
    ids = torch.arange(22 * 4).reshape(22, 4)
    return TokenBatches(ids, torch.ones_like(ids), batch_size=5, seed=1, **kwargs)


def test_token_batches_cover_an_epoch_and_reshuffle():
    batches = make_batches()
    first, second = torch.cat(take(batches, 4)), torch.cat(take(batches, 4))
    assert len(batches) == 4 and first.shape == (20, 4)
    assert len(set(first[:, 0].tolist())) == 20  # no repeats within an epoch
    assert not torch.equal(first, second) and batches.epoch == 1


@pytest.mark.parametrize("stop", [0, 3, 4, 6])  # fresh, mid-epoch, at the epoch end, mid second epoch
def test_token_batches_resume_exactly(stop):
    reference = make_batches()
    want = [b for _ in range(3) for b in reference]
    run = make_batches()
    seen = take(iter_forever(run), stop)
    resumed = make_batches()
    resumed.load_state_dict(run.state_dict())
    got = seen + take(iter_forever(resumed), len(want) - stop)
    assert all(torch.equal(a["input_ids"], b) for a, b in zip(want, got))


def iter_forever(iterable):
    while True:
        yield from iterable


def test_token_batches_state_survives_lightning_combined_loader():
    batches = make_batches()
    assert isinstance(batches, _Stateful) and sized_len(batches) == 4  # sized: Lightning will not prefetch
    loader = CombinedLoader(batches, "max_size_cycle")
    iterator = iter(loader)
    next(iterator), next(iterator)
    states = loader._state_dicts()
    fresh = make_batches()
    CombinedLoader(fresh, "max_size_cycle")._load_state_dicts(states)
    assert torch.equal(next(iter(fresh))["input_ids"], take(batches, 1)[0])


def test_token_batches_refuse_a_different_seed():
    state = make_batches().state_dict()
    other = TokenBatches(torch.zeros(22, 4, dtype=torch.long), torch.ones(22, 4), batch_size=5, seed=2)
    with pytest.raises(UsageError, match="data seed 2 but the checkpoint used 1"):
        other.load_state_dict(state)


def test_token_batches_too_few_sequences():
    with pytest.raises(DataError, match="22 sequences are too few for batch_size 5 on 8 rank"):
        make_batches(world_size=8)


def test_stream_batches_resume_and_shard(tokenizer):
    def stream(**kwargs):
        return StreamBatches(lambda: iter(DOCS), tokenizer, 16, batch_size=2, length=1000, skip=3, **kwargs)

    full = [b["input_ids"] for b in stream()]
    run = stream()
    head = take(run, 4)
    resumed = stream()
    resumed.load_state_dict(run.state_dict())
    tail = [b["input_ids"] for b in resumed]
    assert len(full) > 6 and all(torch.equal(a, b) for a, b in zip(full, head + tail, strict=True))
    rank0, rank1 = ([b["input_ids"] for b in stream(rank=r, world_size=2)] for r in (0, 1))
    assert torch.equal(rank0[0][0], full[0][0]) and torch.equal(
        rank1[0][0], full[0][1]
    )  # round-robin windows


# ------------------------------------------------------------ shuffle buffer
def pushed(buffer: ShuffleBuffer, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    acts = torch.randn(3, 5, 4, generator=generator)
    mask = torch.rand(3, 5, generator=generator) > 0.3
    buffer.push(acts, mask)
    return acts, mask


def test_shuffle_buffer_keeps_only_real_tokens_and_mixes_them():
    buffer = ShuffleBuffer(capacity=32, seed=0)
    acts, mask = pushed(buffer)
    n = int(mask.sum())
    assert len(buffer) == n
    out = torch.cat([buffer.pop(4), buffer.pop(n - 4)])
    assert len(buffer) == 0
    sort = lambda t: t[t[:, 0].argsort()]  # noqa: E731
    torch.testing.assert_close(sort(out), sort(acts[mask]))
    assert not torch.equal(out, acts[mask])  # shuffled, not in push order


def test_shuffle_buffer_is_deterministic_and_resumes_exactly():
    a, b = ShuffleBuffer(32, seed=5), ShuffleBuffer(32, seed=5)
    pushed(a), pushed(b)
    assert torch.equal(a.pop(3), b.pop(3))
    resumed = ShuffleBuffer(32, seed=99)
    resumed.load_state_dict(a.state_dict())
    assert resumed.storage is not None and resumed.storage.device.type == "cpu"
    pushed(a, seed=1), pushed(resumed, seed=1)
    assert len(resumed) == len(a) and torch.equal(a.pop(6), resumed.pop(6))


def test_shuffle_buffer_errors():
    buffer = ShuffleBuffer(capacity=8)
    with pytest.raises(UsageError, match="cannot pop 1 tokens from a ShuffleBuffer holding 0"):
        buffer.pop(1)
    with pytest.raises(UsageError, match="overflow: 0 \\+ 15 tokens exceed capacity 8"):
        buffer.push(torch.randn(3, 5, 2), torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(UsageError, match="capacity must be positive, got 0"):
        ShuffleBuffer(0)


# --------------------------------------------------------------- datamodule
def test_datamodule_on_pydoc(tokenizer):
    dm = ActivationDataModule(tokenizer, n_ctx=64, batch_size=8, val_sequences=16, max_sequences=400)
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert dm.train_dataloader() is train  # Lightning restores state into this very object
    batch = next(iter(train))
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (8, 64)
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long
    assert len(train) == (400 - 16) // 8 and sum(len(b["input_ids"]) for b in val) == 16
    train_rows = {tuple(r.tolist()) for r in train.input_ids}
    assert not train_rows & {tuple(r.tolist()) for b in val for r in b["input_ids"]}


def test_datamodule_shards_by_rank(tokenizer):
    rows = []
    for rank in (0, 1):
        dm = ActivationDataModule(tokenizer, n_ctx=64, batch_size=4, val_sequences=0, max_sequences=40)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2, strategy=CPU)
        rows.append({tuple(r.tolist()) for b in dm.train_dataloader() for r in b["input_ids"]})
    assert len(rows[0]) == len(rows[1]) == 20 and not rows[0] & rows[1]


def test_datamodule_streamed_source(tokenizer, monkeypatch):
    monkeypatch.setattr("datasets.load_dataset", lambda *a, **k: iter([{"text": d} for d in DOCS]))
    dm = ActivationDataModule(tokenizer, source="fineweb-edu", n_ctx=16, batch_size=2, val_sequences=3)
    assert isinstance(dm.train_dataloader(), StreamBatches)
    val_rows = [r for b in dm.val_dataloader() for r in b["input_ids"]]
    first = next(iter(dm.train_dataloader()))["input_ids"]
    windows = list(token_windows(DOCS, tokenizer, 16))
    assert len(val_rows) == 3 and first[0][: len(windows[3])].tolist() == windows[3]


def test_datamodule_argument_errors(tokenizer):
    with pytest.raises(UsageError, match="unknown text source 'pydocs'"):
        ActivationDataModule(tokenizer, source="pydocs")
    with pytest.raises(UsageError, match="n_ctx=0"):
        ActivationDataModule(tokenizer, n_ctx=0)
    with pytest.raises(UsageError, match="streamed source 'fineweb-edu' needs val_sequences as a count"):
        ActivationDataModule(tokenizer, source="fineweb-edu", val_sequences=0.1)
    assert corpus.STREAMED <= set(corpus.SOURCES)
