"""The recovery analysis: a coder built to span the planted manifolds recovers them all; a random one does not."""

from __future__ import annotations

import torch

from bilae import Autoencoder
from bilae.analysis import registry as R
from bilae.analysis.recovery import candidate_forms, recover, recover_planted, top_eigenvectors
from bilae.analysis.session import AnalysisSession
from bilae.synthetic import plant

D = 16


def planted_coder(truth, affine: bool = False) -> Autoencoder:
    """A mixed coder whose latents l = r run over each manifold's span, one bottleneck row per manifold."""
    spans = truth.spans()
    m = sum(s.shape[1] for s in spans)
    coder = Autoencoder.from_config("mixed", d_model=D, layer=0, expansion=1, bottleneck=1, affine=affine)
    left, down = torch.zeros(coder.d_features, D), torch.zeros_like(coder.down)
    start = 0
    for k, span in enumerate(spans):
        left[start : start + span.shape[1]] = span.T
        down[k, start : start + span.shape[1]] = 1.0
        start += span.shape[1]
    assert start == m <= coder.d_features
    with torch.no_grad():
        coder.left.copy_(left)
        coder.right.copy_(left)
        coder.down.copy_(down)
    return coder


def test_top_eigenvectors_by_magnitude():
    forms = torch.diag_embed(torch.tensor([[1.0, -5.0, 2.0, 0.5]])).double()
    vectors = top_eigenvectors(forms, 2)[0]
    assert torch.allclose(vectors.abs(), torch.eye(4, dtype=torch.float64)[:, [1, 2]])


def test_a_coder_spanning_the_planted_manifolds_recovers_all_of_them():
    truth = plant(D, circles=2, spheres=1, offset_fraction=0.5, n_features=4, seed=1)
    for affine in (False, True):
        found = recover_planted(planted_coder(truth, affine), truth)
        assert found.recovered(0.9) == 1.0 and float(found.scores.min()) > 0.999
        assert [
            c.startswith("composite") or "cluster" in c or c.startswith("latent") for c in found.candidates
        ]
    random = Autoencoder.from_config("mixed", d_model=D, layer=0, expansion=2, bottleneck=1)
    assert recover_planted(random, truth).recovered(0.9) == 0.0
    forms, names = candidate_forms(random)
    assert forms.shape[1:] == (D, D) and len(names) == len(forms)
    assert torch.allclose(forms, forms.transpose(1, 2))
    assert recover(truth, forms, names).names == truth.names()


def test_recovery_analysis_panels_and_opt_in(tmp_path):
    truth = plant(D, circles=1, spheres=1, offset_fraction=0.0, n_features=4, seed=2)
    path = truth.save(tmp_path / "planted.safetensors")
    session = AnalysisSession(planted_coder(truth), [], None)
    settings = R.AnalysisSettings(run=["recovery"], options={"recovery": {"planted": str(path)}})
    (result,) = R.run_analyses(session, [0], settings)
    assert set(result.panels) == {
        "analysis/recovery/cosines",
        "analysis/recovery/summary",
        "analysis/recovery/table",
    }
    assert "recovered 100% of 2 planted manifolds" in result.panels["analysis/recovery/summary"].html
    rows = result.panels["analysis/recovery/table"].rows
    assert [r["manifold"] for r in rows] == ["circle 0", "sphere 1"] and min(
        r["min cosine"] for r in rows
    ) > 0.999
    names = [r.analysis.name for r in R.run_analyses(session, [0], R.AnalysisSettings())]
    assert "recovery" not in names and "compare" not in names  # opt-in: left out without their input
