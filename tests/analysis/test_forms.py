"""Quadratic forms and spectra against explicit sums and eigvalsh."""

import pytest
import torch

from bilae import Autoencoder, UsageError
from bilae.analysis import latent_form, overlap_matrix, quadratic_form, spectrum


@pytest.fixture
def coder():
    return Autoencoder.from_config("combined", d_model=6, layer=0, expansion=3).double()


def test_quadratic_form_is_symmetrised_weighted_sum():
    left, right = torch.randn(10, 4, dtype=torch.float64), torch.randn(10, 4, dtype=torch.float64)
    idx, w = [2, 7, 3], [0.5, -1.0, 2.0]
    direct = sum(wk * torch.outer(left[k], right[k]) for k, wk in zip(idx, w))
    form = quadratic_form(left, right, idx, w)
    assert torch.allclose(form, (direct + direct.T) / 2)
    assert torch.allclose(form, form.T)
    unweighted = sum(torch.outer(left[k], right[k]) for k in idx)
    assert torch.allclose(quadratic_form(left, right, idx), (unweighted + unweighted.T) / 2)


def test_spectrum_is_eigvalsh_sorted_by_magnitude():
    a = torch.randn(7, 7, dtype=torch.float64)
    spec = spectrum(a)
    sym = (a + a.T) / 2
    expected = torch.linalg.eigvalsh(sym)
    assert torch.allclose(spec.eigenvalues.sort().values, expected)
    assert torch.all(spec.eigenvalues.abs()[:-1] >= spec.eigenvalues.abs()[1:])
    rebuilt = spec.eigenvectors @ torch.diag(spec.eigenvalues) @ spec.eigenvectors.T
    assert torch.allclose(rebuilt, sym)
    assert spec.top(3).shape == (7, 3)
    assert torch.allclose(sym @ spec.top(1)[:, 0], spec.eigenvalues[0] * spec.top(1)[:, 0])


def test_latent_form_defaults_to_the_notebooks_unweighted_sum(coder):
    g = overlap_matrix(coder)
    form = latent_form(coder, 4, k=5)
    expected_idx = g[4].abs().topk(5).indices
    assert form.indices.tolist() == expected_idx.tolist()
    assert 4 in form.indices.tolist()  # G[i, i] = 1 is always among the largest
    left, right = coder.left.detach(), coder.right.detach()
    # The seed: einsum(coder.left[inds], coder.right[inds], "out in1, out in2 -> in1 in2"), symmetrised.
    density = left[expected_idx].T @ right[expected_idx]
    assert torch.allclose(form.matrix, 0.5 * (density + density.T))
    assert torch.allclose(form.weights, torch.ones(5, dtype=form.weights.dtype))


@pytest.mark.parametrize(("weights", "transform"), [("overlap", lambda v: v), ("abs_overlap", torch.abs)])
def test_latent_form_overlap_weightings(coder, weights, transform):
    g = overlap_matrix(coder)
    form = latent_form(coder, 4, k=5, weights=weights)
    idx = g[4].abs().topk(5).indices
    assert torch.allclose(form.weights, transform(g[4, idx]))
    left, right = coder.left.detach(), coder.right.detach()
    direct = sum(transform(g[4, k]) * torch.outer(left[k], right[k]) for k in idx)
    assert torch.allclose(form.matrix, (direct + direct.T) / 2, atol=1e-6)


def test_latent_form_unknown_weights_named():
    coder = Autoencoder.from_config("mixed", d_model=6, layer=0, expansion=2)
    with pytest.raises(
        UsageError, match="unknown form weights 'signed'; valid: uniform, overlap, abs_overlap"
    ):
        latent_form(coder, 0, weights="signed")


def test_affine_latent_form_is_lifted():
    coder = Autoencoder.from_config("mixed", d_model=6, layer=0, expansion=2, affine=True)
    with torch.no_grad():
        coder.left_bias.normal_()
        coder.right_bias.normal_()
    form = latent_form(coder, 3, k=4)
    assert form.matrix.shape == (7, 7)
    xhat = torch.nn.functional.normalize(torch.randn(5, 6), dim=-1)
    z = torch.cat([torch.ones(5, 1), xhat], 1)
    f = coder.features(xhat)[:, form.indices].sum(-1)  # Σ_k (l_k·x̂ + a_k)(r_k·x̂ + c_k) = zᵀ M z
    assert torch.allclose(((z @ form.matrix) * z).sum(-1), f, atol=1e-5)


def test_feature_index_out_of_range_names_range(coder):
    with pytest.raises(UsageError, match=r"feature index 18 is out of range; valid: 0 to 17"):
        latent_form(coder, 18)
    with pytest.raises(UsageError, match="k must be between 1 and the number of latents 18"):
        latent_form(coder, 0, k=0)
    with pytest.raises(UsageError, match="valid: 0 to 9"):
        quadratic_form(torch.randn(10, 3), torch.randn(10, 3), [10])


def test_bad_shapes_and_weights():
    with pytest.raises(UsageError, match=r"square \(d, d\).*\(3, 4\)"):
        spectrum(torch.randn(3, 4))
    with pytest.raises(UsageError, match="2 weights for 3 latents"):
        quadratic_form(torch.randn(10, 3), torch.randn(10, 3), [0, 1, 2], [1.0, 2.0])


def test_latent_form_needs_bottleneck():
    coder = Autoencoder.from_config("vanilla", d_model=6, layer=0, expansion=2)
    with pytest.raises(UsageError, match="'mixed' or 'combined'"):
        latent_form(coder, 0)
