"""The manifold and spectrum analyses name their form weighting in panel titles and (other than the default) keys."""

from __future__ import annotations

import pytest
import torch

from bilae import Autoencoder, UsageError
from bilae.analysis import registry as R
from bilae.analysis.forms import latent_form
from bilae.analysis.session import AnalysisSession

D = 8


@pytest.fixture
def session() -> AnalysisSession:
    coder = Autoencoder.from_config("mixed", d_model=D, layer=0, expansion=2, bottleneck=1)
    ids = torch.randint(0, 30, (4, 6))
    batches = [(torch.randn(4, 6, D), torch.ones(4, 6, dtype=torch.bool), ids)]
    return AnalysisSession(coder, batches, None)


@pytest.mark.parametrize(
    ("weights", "prefix"), [("uniform", ""), ("overlap", "overlap/"), ("abs_overlap", "abs_overlap/")]
)
def test_weighting_in_keys_titles_and_forms(session, weights, prefix):
    options = {"manifold": {"points": 10, "weights": weights}, "spectrum": {"weights": weights}}
    settings = R.AnalysisSettings(run=["manifold", "spectrum"], options=options)
    panels = R.all_panels(R.run_analyses(session, [2, 5], settings))
    assert set(panels) == {f"analysis/{a}/{prefix}{i}" for a in ("manifold", "spectrum") for i in (2, 5)}
    manifold, spectrum = panels[f"analysis/manifold/{prefix}5"], panels[f"analysis/spectrum/{prefix}5"]
    assert manifold.layout.title.text.startswith(f"latent 5 ({weights} weights; λ: ")
    assert spectrum.layout.title.text == f"Spectrum of latent 5 ({weights} weights)"
    expected = latent_form(session.coder, 5, weights=weights).matrix
    assert torch.allclose(session.form(5, weights=weights).matrix, expected)


def test_unknown_weighting_is_one_clear_error(session):
    settings = R.AnalysisSettings(run=["spectrum"], options={"spectrum": {"weights": "signed"}})
    with pytest.raises(
        UsageError, match="unknown form weights 'signed'; valid: uniform, overlap, abs_overlap"
    ):
        R.run_analyses(session, [0], settings)


def test_default_config_names_the_weighting():
    from bilae.config import compose

    cfg = compose("train", ["analysis.options.manifold.weights=abs_overlap"])
    options = R.AnalysisSettings.from_config(cfg.analysis).options
    assert options["manifold"]["weights"] == options["spectrum"]["weights"] == "abs_overlap"
    assert R.ANALYSES["manifold"].options()["weights"] == "uniform"
