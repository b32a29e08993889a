"""Activation cache: round trip vs live harvesting, shuffling and exact resume, training without the LM, errors."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bilae import Autoencoder
from bilae import builders as B
from bilae import train as T
from bilae.analysis.session import predictions_note, sample_tokenizer, validation_sample
from bilae.cache_reader import CachedTokens, read_meta, shard_paths
from bilae.cache_writer import build_cache
from bilae.errors import CheckpointError, DataError, UsageError
from bilae.source import ActivationSource
from tests.support.configs import (
    TINY_ANALYZE,
    TINY_FOR_CACHE,
    cache_cfg,
    cached_train_cfg,
    cli,
    cli_env,
    train_cfg,
)


@pytest.fixture(scope="module")
def fp16_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("cache") / "fp16"
    build_cache(cache_cfg(directory))
    return directory


@pytest.fixture(scope="module")
def fp32_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("cache") / "fp32"
    build_cache(cache_cfg(directory, "cache.dtype=float32"))
    return directory


def read_split(directory: Path, split: str) -> dict[str, torch.Tensor]:
    meta = read_meta(directory)
    shards = [load_file(str(path)) for path, _ in shard_paths(directory, meta, split)]
    return {key: torch.cat([s[key] for s in shards]) for key in ("acts", "token_ids", "sequence", "position")}


# ---------------------------------------------------------------------------------------------- round trip
def test_cache_round_trip_equals_live_harvest(fp16_cache: Path) -> None:
    cfg = cache_cfg(fp16_cache)
    harvester = B.build_harvester(cfg.model)
    datamodule = B.build_datamodule(cfg, harvester.tokenizer)
    datamodule.setup("fit")
    meta = read_meta(fp16_cache)
    assert (meta["model"], meta["layer"], meta["d_model"], meta["n_ctx"], meta["dtype"]) == (
        "qwen3-tiny", 2, 64, 32, "float16",
    )  # fmt: skip
    assert meta["shards"] == len(meta["splits"]["train"]["shards"]) + len(meta["splits"]["val"]["shards"]) > 2
    for split, batches in (("train", datamodule.train), ("val", datamodule.val)):
        ids, attention = batches.input_ids, batches.attention_mask
        acts, mask = harvester(ids, attention)
        cached = read_split(fp16_cache, split)
        rows, cols = mask.nonzero(as_tuple=True)
        assert meta["splits"][split]["n_tokens"] == len(rows)
        torch.testing.assert_close(cached["acts"].float(), acts[rows, cols], rtol=1e-3, atol=1e-3)
        assert torch.equal(cached["sequence"], rows) and torch.equal(cached["position"].long(), cols)
        assert torch.equal(cached["token_ids"].long(), ids[rows, cols])
    # The windows stored with a shard are the full sequences its tokens come from.
    first = load_file(str(fp16_cache / meta["splits"]["train"]["shards"][1]["file"]))
    sequences = datamodule.train.input_ids[first["window_index"]]
    assert torch.equal(first["windows"].long(), sequences)
    assert set(first["window_index"].tolist()) == set(first["sequence"].tolist())


# ------------------------------------------------------------------------------------------ batches, resume
def fake_shards(directory: Path, sizes: list[int]) -> list[tuple[Path, int]]:
    """Shards whose activation rows hold their global token index, so batches can be traced back."""
    shards, start = [], 0
    for i, n in enumerate(sizes):
        path = directory / f"{i}.safetensors"
        save_file({"acts": torch.arange(start, start + n).float()[:, None].repeat(1, 3)}, str(path))
        shards.append((path, n))
        start += n
    return shards


def tokens(batches: list[dict[str, torch.Tensor]]) -> list[int]:
    return [int(t) for b in batches for t in b["acts"][:, 0]]


def test_an_epoch_shuffles_across_shards_and_resumes_exactly(tmp_path: Path) -> None:
    shards = fake_shards(tmp_path, [50, 70, 30, 64, 40])
    make = lambda **kw: CachedTokens(shards, 3, torch.float32, 16, seed=1, window_shards=2, **kw)  # noqa: E731
    full = list(make())
    assert len(full) == 254 // 16 and all(b["mask"].all() and len(b["acts"]) == 16 for b in full)
    seen = tokens(full)
    assert len(set(seen)) == len(seen) and seen != sorted(seen)
    assert len({t // 100 for t in seen[:16]}) > 1  # a batch mixes tokens of different shards
    assert tokens(list(make())) == seen  # deterministic
    # Interrupted after 5 batches, resumed in a fresh object from the state: the same remaining batches.
    first = make()
    head = [b for _, b in zip(range(5), first)]
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    assert tokens(head + list(resumed)) == seen
    # The next epoch is another order; two ranks split an epoch's batches between them.
    second = make()
    list(second)
    assert tokens(list(second)) != seen
    ranks = [tokens(list(make(rank=r, world_size=2))) for r in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1]) and len(ranks[0]) == len(ranks[1]) == 7 * 16
    assert sorted(ranks[0] + ranks[1]) == sorted(seen[: 14 * 16])


def test_validation_keeps_order_and_the_short_last_batch(tmp_path: Path) -> None:
    shards = fake_shards(tmp_path, [20, 15])
    val = CachedTokens(shards, 3, torch.float32, 8, shuffle=False, drop_last=False)
    assert tokens(list(val)) == list(range(35)) and len(val) == 5


def test_resume_refuses_another_seed(tmp_path: Path) -> None:
    shards = fake_shards(tmp_path, [40])
    state = CachedTokens(shards, 3, torch.float32, 8, seed=0).state_dict()
    with pytest.raises(UsageError, match="seed 1.*seed 0"):
        CachedTokens(shards, 3, torch.float32, 8, seed=1).load_state_dict(state)


# ----------------------------------------------------------------------------------------------- training
@pytest.mark.slow
def test_training_from_the_cache_matches_live_harvesting(
    fp32_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    common = ["steps=60", "trainer.val_check_interval=60", "buffer_tokens=0"]
    live_module, live_data, live_trainer = B.build(
        train_cfg(tmp_path / "live", *common, "data.max_sequences=160")
    )
    live_initial = live_trainer.validate(live_module, datamodule=live_data, verbose=False)[0]["val/mse"]
    live_trainer.fit(live_module, datamodule=live_data)
    live = live_trainer.validate(live_module, datamodule=live_data, verbose=False)[0]["val/mse"]

    def no_lm(*args: object, **kwargs: object) -> None:
        raise AssertionError("the LM must not be loaded when training from a cache")

    monkeypatch.setattr(B, "build_harvester", no_lm)
    monkeypatch.setattr(B, "load_lm", no_lm)
    # Live batches keep ~120 of their 4 x 32 tokens (no padding in this corpus, [CLS]/[SEP] masked): same here.
    tokens_per_step = (
        read_meta(fp32_cache)["splits"]["train"]["n_tokens"] // len(live_data.train.input_ids) * 4
    )
    cached = cached_train_cfg(tmp_path / "cache", fp32_cache, *common, f"data.batch_tokens={tokens_per_step}")
    module, datamodule, trainer = B.build(cached)
    assert datamodule.activations.harvester is None
    initial = trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val/mse"]
    # Same seed, same initial coder, same validation tokens (float32 cache): the same starting point exactly.
    assert initial == pytest.approx(live_initial, rel=1e-5)
    trainer.fit(module, datamodule=datamodule)
    final = trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val/mse"]
    assert trainer.global_step == live_trainer.global_step == 60
    assert final < 0.8 * initial and final == pytest.approx(live, rel=0.02), (initial, live, final)


@pytest.mark.slow
def test_run_from_the_cache_exports_and_resumes(fp16_cache: Path, tmp_path: Path) -> None:
    common = ["steps=10", "trainer.val_check_interval=5", "buffer_tokens=0", "data.batch_tokens=200",
              "data.window_shards=2", "callbacks=checkpoint", "callbacks.checkpoint.every_n_train_steps=4"]  # fmt: skip
    full_module, dm, trainer = B.build(cached_train_cfg(tmp_path / "full", fp16_cache, *common))
    trainer.fit(full_module, datamodule=dm)
    part_module, dm, part_trainer = B.build(
        cached_train_cfg(tmp_path / "part", fp16_cache, *common, "trainer.max_steps=4")
    )
    part_trainer.fit(part_module, datamodule=dm)
    resumed_cfg = cached_train_cfg(tmp_path / "part", fp16_cache, *common, "ckpt_path=last")
    metrics = T.run(resumed_cfg)
    assert metrics["steps"] == 10
    name = "mixed-l02-x2-a10-b0"
    resumed = Autoencoder.load(tmp_path / "part" / "autoencoder" / name)
    for key, tensor in full_module.coder.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], tensor, rtol=0, atol=1e-6, msg=key)


# -------------------------------------------------------------------------------------------------- errors
def test_missing_and_unfinished_caches_are_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nowhere does not exist"):
        read_meta(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"meta.json is missing.*did not finish"):
        read_meta(tmp_path)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match=r"meta.json is not valid JSON"):
        read_meta(tmp_path)


def copy_cache(source: Path, target: Path) -> Path:
    target.mkdir()
    for path in source.rglob("*"):
        if path.is_file():
            (target / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            (target / path.relative_to(source)).write_bytes(path.read_bytes())
    return target


def test_missing_or_corrupt_shard_is_named(fp16_cache: Path, tmp_path: Path) -> None:
    broken = copy_cache(fp16_cache, tmp_path / "broken")
    meta = read_meta(broken)
    shard = broken / meta["splits"]["train"]["shards"][1]["file"]
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated, like an interrupted copy
    with pytest.raises(DataError, match=rf"{shard}.*corrupt"):
        shard_paths(broken, meta, "train")
    shard.unlink()
    with pytest.raises(DataError, match=rf"{shard} is missing"):
        shard_paths(broken, meta, "train")


def test_empty_cache_is_refused(fp16_cache: Path, tmp_path: Path) -> None:
    empty = copy_cache(fp16_cache, tmp_path / "empty")
    meta = json.loads((empty / "meta.json").read_text())
    meta["splits"]["train"] = {"n_tokens": 0, "n_sequences": 0, "shards": []}
    (empty / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="holds no training tokens"):
        read_meta(empty)


def test_cache_must_match_the_model_and_layer(fp16_cache: Path, tmp_path: Path) -> None:
    cfg = cached_train_cfg(tmp_path, fp16_cache, "model.layer=1")
    with pytest.raises(UsageError, match=r"model 'qwen3-tiny' at layer 2.*layer 1.*model.layer=2"):
        B.build(cfg)
    wrong = Autoencoder.from_config("mixed", d_model=32, layer=2, expansion=2, bottleneck=1)
    wrong.save(tmp_path / "wrong")
    cfg = cached_train_cfg(tmp_path, fp16_cache, f"init_from={tmp_path}/wrong")
    with pytest.raises(CheckpointError, match=r"d_model 32.*d_model 64"):
        B.build(cfg)


def test_existing_cache_is_not_overwritten_by_accident(fp16_cache: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="already holds an activation cache.*overwrite"):
        build_cache(cache_cfg(fp16_cache))
    reading = cache_cfg(tmp_path / "new")
    reading.data.source = "cache"
    with pytest.raises(UsageError, match="data=cache reads a cache"):
        build_cache(reading)
    with pytest.raises(UsageError, match="unknown cache dtype 'int8'"):
        build_cache(cache_cfg(tmp_path / "new", "cache.dtype=int8"))


# ---------------------------------------------------------------------------------------- analysis sample
def test_the_analysis_sample_comes_from_the_cache_alone(fp16_cache: Path, tmp_path: Path) -> None:
    """The cached sample equals a live harvest of the same validation windows; predictions only with an LM."""
    cfg = cache_cfg(fp16_cache)
    harvester = B.build_harvester(cfg.model)
    live = B.build_datamodule(cfg, harvester.tokenizer)
    live.setup("validate")
    ids, attention = live.val.input_ids[:6], live.val.attention_mask[:6]
    acts, mask = harvester(ids, attention)

    cached = B.build_datamodule(
        cached_train_cfg(tmp_path, fp16_cache), tokenizer=None, activations=ActivationSource()
    )
    got_acts, got_mask, got_ids, got_attention = cached.sample_activations(6)
    assert torch.equal(got_mask, mask) and torch.equal(got_ids, ids) and torch.equal(got_attention, attention)
    torch.testing.assert_close(got_acts[mask], acts[mask], rtol=1e-3, atol=1e-3)
    assert not got_acts[~mask].any()
    assert len(cached.sample_activations(1000)[0]) == len(live.val.input_ids)  # all the split holds

    batches = validation_sample(cached, 6, batch_size=4)  # training from a cache: no LM
    assert [len(b) for b in batches] == [3, 3] and predictions_note(batches, None).startswith(
        "absent: no language"
    )
    assert sample_tokenizer(cached).decode([101]) == harvester.tokenizer.decode(
        [101]
    )  # the cache's own tokenizer

    with_lm = B.build_datamodule(
        cached_train_cfg(tmp_path, fp16_cache),
        tokenizer=harvester.tokenizer,
        activations=ActivationSource(harvester),
    )
    batches = validation_sample(with_lm, 6, batch_size=6)  # bilae-analyze data=cache: the LM is loaded
    (only,) = batches
    expected = harvester.model(input_ids=ids, attention_mask=attention).logits.argmax(-1)
    assert (
        len(only) == 4
        and torch.equal(only[3], expected)
        and predictions_note(batches, harvester).startswith("shown")
    )


@pytest.mark.slow
def test_a_cache_trained_run_and_bilae_analyze_on_it_show_manifolds_and_contexts(
    fp16_cache: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    common = ["trainer.enable_progress_bar=false", "data.batch_tokens=200", "buffer_tokens=0", "logger=none"]
    trained = subprocess.run(
        cli("bilae.train", *TINY_FOR_CACHE, "data=cache", f"data.dir={fp16_cache}", *common, "steps=4",
            "trainer.val_check_interval=4", "callbacks=default", "analysis.options.manifold.points=100",
            f"hydra.run.dir={run}"),
        cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "no activation sample" not in trained.stderr and "skipped" not in trained.stderr, trained.stderr
    report = (run / "report.html").read_text()
    assert_manifolds_and_contexts(report)
    assert "absent: no language model is loaded (the sample comes from the activation cache)" in report

    analysed = subprocess.run(
        cli("bilae.analyze", f"checkpoint={run}", *[o for o in TINY_ANALYZE if not o.startswith("data.")],
            "logger=none", "data=cache",
            f"data.dir={fp16_cache}", f"hydra.run.dir={tmp_path / 'analysis'}"),
        cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert analysed.returncode == 0, analysed.stderr[-3000:]
    report = (tmp_path / "analysis" / "report.html").read_text()
    assert_manifolds_and_contexts(report)
    assert "shown in the manifold hover texts" in report  # the tiny Qwen3 has an LM head


def assert_manifolds_and_contexts(report: str) -> None:
    views = json.loads(re.search(r'id="manifold-data">(.*?)</script>', report, re.S).group(1))  # type: ignore[union-attr]
    assert views and all(len(view["data"][0]["x"]) > 0 for view in views)
    contexts = re.findall(r'white-space:pre">(.*?)</div>', report)
    assert len(contexts) >= 4 and not any("##" in c for c in contexts), contexts[:4]
    assert re.search(r"<b>sample</b></td><td>[1-9]\d* tokens", report)
