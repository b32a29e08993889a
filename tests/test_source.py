"""The activation source: harvesting on the device, the shuffling buffer's warm-up, cached batches, its state."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from bilae.errors import TrainingError, UsageError
from bilae.hooks import Harvester
from bilae.source import ActivationSource, ShuffleBuffer, SourcedDataModule

D = 4


def cached_batch(n: int = 6, masked: int = 2, start: float = 0.0) -> dict[str, torch.Tensor]:
    """Activations whose first column numbers the tokens; the last ``masked`` tokens are not real."""
    acts = torch.arange(start, start + n)[:, None].repeat(1, D)
    mask = torch.ones(n, dtype=torch.bool)
    mask[n - masked :] = False
    return {"acts": acts, "mask": mask}


def test_cached_batches_give_their_real_tokens_without_a_buffer() -> None:
    source = ActivationSource()
    for training in (True, False):
        out = source(cached_batch(), training=training)
        assert set(out) == {"acts"} and out["acts"][:, 0].tolist() == [0, 1, 2, 3]


def test_harvested_batches_keep_the_harvesters_mask(qwen3_tiny) -> None:
    model, tokenizer = qwen3_tiny
    harvester = Harvester(model, tokenizer, 2)
    ids = torch.tensor([[101, 2023, 2003, 102, 0]])
    attention = torch.tensor([[1, 1, 1, 1, 0]])
    acts, mask = harvester(ids, attention)
    out = ActivationSource(harvester)({"input_ids": ids, "attention_mask": attention}, training=False)
    assert torch.equal(out["acts"], acts[mask]) and out["acts"].shape == (2, 64), "[CLS], [SEP], padding out"
    with pytest.raises(UsageError, match="no language model was loaded"):
        ActivationSource()({"input_ids": ids, "attention_mask": attention}, training=True)


def test_buffer_warms_up_then_returns_as_many_tokens_as_come_in() -> None:
    source = ActivationSource(buffer=ShuffleBuffer(capacity=16, seed=0))
    sizes = [len(source(cached_batch(start=10 * i), training=True)["acts"]) for i in range(6)]
    # 4 real tokens per batch: while below half of 16 the buffer keeps half of them (4, then 6 held after the
    # push), from 8 held on it gives back all 4, keeping a steady reserve of 4.
    assert sizes == [2, 2, 4, 4, 4, 4], sizes
    assert len(source.buffer) == 4  # type: ignore[arg-type]
    # Validation batches never go through the buffer.
    assert len(source(cached_batch(), training=False)["acts"]) == 4
    with pytest.raises(TrainingError, match="no real tokens"):
        source(cached_batch(masked=6), training=True)


def test_the_data_modules_state_is_the_sources_and_resumes_exactly() -> None:
    def module() -> SourcedDataModule:
        dm = SourcedDataModule(ActivationSource(buffer=ShuffleBuffer(capacity=16, seed=3)))
        dm.trainer = SimpleNamespace(training=True, strategy=SimpleNamespace(root_device=torch.device("cpu")))
        return dm

    first = module()
    head = [first.on_after_batch_transfer(cached_batch(start=10 * i), 0)["acts"] for i in range(4)]
    state = first.state_dict()
    tail = [first.on_after_batch_transfer(cached_batch(start=10 * i), 0)["acts"] for i in range(4, 8)]
    resumed = module()
    resumed.load_state_dict(state)
    again = [resumed.on_after_batch_transfer(cached_batch(start=10 * i), 0)["acts"] for i in range(4, 8)]
    assert all(torch.equal(a, b) for a, b in zip(tail, again)) and len(head) == 4
    assert SourcedDataModule().state_dict() == {}, "no buffer: nothing to save"
