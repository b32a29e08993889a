"""``bilae-train experiment=planted``: a coder trained on planted manifolds, without any LM, recovers them."""

from __future__ import annotations

import pytest
import torch

from bilae.builders import build
from bilae.callbacks import AnalysisCallback
from bilae.synthetic import PlantedManifolds
from tests.support.configs import composed


@pytest.fixture
def one_thread():
    """One intra-op thread: at m = 128 more threads only contend (2 threads on 2 busy cores: minutes slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_planted_manifolds_are_recovered_at_the_default_settings(tmp_path, one_thread):
    cfg = composed(
        "train",
        [
            "experiment=planted",
            "logger=none",
            "trainer.enable_progress_bar=false",
            f"paths.output_dir={tmp_path}",
        ],
    )
    module, datamodule, trainer = build(cfg)
    assert datamodule.activations.harvester is None  # no language model was loaded
    trainer.fit(module, datamodule=datamodule)
    truth = PlantedManifolds.load(tmp_path / "planted.safetensors")
    assert len(truth) == 8 and sum(float(o.norm()) > 0 for o in truth.offsets) == 4
    (callback,) = [c for c in trainer.callbacks if isinstance(c, AnalysisCallback)]
    (results,) = callback.results.values()
    (recovery,) = [r for r in results if r.analysis.name == "recovery"]
    rows = recovery.panels["analysis/recovery/table"].rows
    # Measured at these settings: every centred circle and sphere, one of two offset circles, no offset sphere
    # (5 of 8; the target is 80%, not met yet). The centred ones must stay recovered.
    centred = [r for r in rows if "offset" not in r["manifold"]]
    assert len(centred) == 4 and all(r["min cosine"] >= 0.9 for r in centred), rows
    assert sum(r["min cosine"] >= 0.9 for r in rows) >= 5, rows
    assert "Planted manifolds recovered" in (tmp_path / "report.html").read_text(encoding="utf-8")
