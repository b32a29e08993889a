"""Planted manifolds (bilae/synthetic.py): geometry, determinism, resumption, saving, and refused set-ups."""

from __future__ import annotations

import pytest
import torch

from bilae import UsageError
from bilae.errors import CheckpointError
from bilae.synthetic import PlantedDataModule, PlantedManifolds, plant, sample_tokens


def test_planted_geometry_and_clean_points():
    truth = plant(16, circles=2, spheres=2, offset_fraction=0.5, n_features=8, seed=3)
    assert truth.kinds == ["circle", "circle", "sphere", "sphere"]
    assert truth.names() == ["circle 0 (offset)", "circle 1", "sphere 2 (offset)", "sphere 3"]
    for basis, offset, span in zip(truth.bases, truth.offsets, truth.spans()):
        assert torch.allclose(basis.T @ basis, torch.eye(basis.shape[1]), atol=1e-5)
        assert torch.allclose(basis.T @ offset, torch.zeros(basis.shape[1]), atol=1e-5)
        assert span.shape[1] == basis.shape[1] + (1 if float(offset.norm()) > 0 else 0)
    g = torch.Generator().manual_seed(0)
    x, which = sample_tokens(truth, 400, g, feature_prob=0.0, manifold_prob=1.0, noise=0.0)
    for i, (basis, offset) in enumerate(zip(truth.bases, truth.offsets)):
        on = x[which == i] - offset
        assert len(on) > 0 and torch.allclose(on.norm(dim=1), torch.ones(len(on)), atol=1e-5)
        assert torch.allclose(on @ basis @ basis.T, on, atol=1e-5)  # in the planted subspace


def test_batches_are_deterministic_and_resume_exactly(tmp_path):
    data = PlantedDataModule(
        d_model=16, circles=1, spheres=1, batch_tokens=32, planted_file=str(tmp_path / "p.st")
    )
    data.setup("fit")
    first = [b["acts"] for _, b in zip(range(3), data.train_dataloader())]
    again = PlantedDataModule(d_model=16, circles=1, spheres=1, batch_tokens=32)
    state = {"position": 2}
    again.train.load_state_dict(state)
    assert torch.equal(next(iter(again.train))["acts"], first[2])
    loaded = PlantedManifolds.load(tmp_path / "p.st")
    assert loaded.kinds == data.truth.kinds and torch.equal(loaded.bases[1], data.truth.bases[1])
    acts, mask, ids, attention = data.sample_activations(2)
    assert acts.shape == (2, 64, 16) and bool(mask.all()) and int(ids.max()) <= 2
    assert sum(int(b["mask"].sum()) for b in data.val_dataloader()) == 4096


def test_bad_planted_setups_are_refused(tmp_path):
    with pytest.raises(UsageError, match=r"3 circles and 3 spheres need d_model > 15, got 8"):
        PlantedDataModule(d_model=8, circles=3, spheres=3)
    with pytest.raises(UsageError, match="must lie in \\[0, 1\\] and noise >= 0; got 0.5, 0.02, 0.8, -1"):
        PlantedDataModule(noise=-1)
    with pytest.raises(UsageError, match="at least one manifold"):
        PlantedDataModule(circles=0, spheres=0)
    with pytest.raises(CheckpointError, match="no planted manifolds at"):
        PlantedManifolds.load(tmp_path / "missing.safetensors")
