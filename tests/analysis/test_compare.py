"""Comparing two autoencoders against explicit d×d matrices (MATH.md, "Comparing two autoencoders")."""

from __future__ import annotations

import pytest
import torch

from bilae import Autoencoder, UsageError
from bilae.analysis import registry as R
from bilae.analysis.compare import (
    best_matches,
    compare_coders,
    form_similarity,
    input_subspace,
    principal_cosines,
)
from bilae.analysis.session import AnalysisSession

D = 7


def sym(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    outer = torch.outer(u, v)
    return (outer + outer.T) / 2


def oracle_similarity(la, ra, lb, rb) -> torch.Tensor:
    """Frobenius cosines of explicitly built symmetrised forms."""
    a = [sym(u, v) for u, v in zip(la, ra)]
    b = [sym(u, v) for u, v in zip(lb, rb)]
    return torch.tensor(
        [[float((x * y).sum() / (x.norm() * y.norm())) for y in b] for x in a], dtype=la.dtype
    )


def test_form_similarity_and_chunked_best_match_equal_the_oracle():
    g = torch.Generator().manual_seed(1)
    la, ra, lb, rb = (torch.randn(n, D, generator=g, dtype=torch.float64) for n in (9, 9, 13, 13))
    expected = oracle_similarity(la, ra, lb, rb)
    assert torch.allclose(form_similarity(la, ra, lb, rb), expected, atol=1e-12)
    for chunk in (1, 4, 13, 100):
        best, match = best_matches(la, ra, lb, rb, chunk=chunk)
        values, where = expected.abs().max(-1)
        assert torch.allclose(best, values, atol=1e-12) and torch.equal(match, where)
    with pytest.raises(UsageError, match="chunk must be a positive number of latents, got 0"):
        best_matches(la, ra, lb, rb, chunk=0)


def test_input_subspace_is_the_top_eigenvectors_of_the_explicit_sum():
    g = torch.Generator().manual_seed(2)
    left, right = (torch.randn(11, D, generator=g, dtype=torch.float64) for _ in range(2))
    total = sum(torch.outer(u, u) + torch.outer(v, v) for u, v in zip(left, right))
    values, vectors = torch.linalg.eigh(total)
    basis = input_subspace(left, right, 3)
    assert torch.allclose(total @ basis, basis * values[-3:].flip(0), atol=1e-9)
    assert torch.allclose(principal_cosines(basis, vectors[:, -3:]), torch.ones(3, dtype=torch.float64))
    with pytest.raises(UsageError, match="rank must be between 1 and d_model 7, got 8"):
        input_subspace(left, right, 8)


def test_principal_cosines_against_known_angles():
    e = torch.eye(4, dtype=torch.float64)
    theta = torch.tensor(0.3, dtype=torch.float64)
    a = e[:, :2]
    b = (
        torch.stack([e[:, 0], torch.cos(theta) * e[:, 1] + torch.sin(theta) * e[:, 2]], 1) * 5
    )  # scale is ignored
    assert torch.allclose(
        principal_cosines(a, b), torch.stack([torch.ones((), dtype=torch.float64), theta.cos()])
    )
    with pytest.raises(UsageError, match=r"two \(d, r\) bases of one shape"):
        principal_cosines(a, e[:, :3])


def test_a_coder_matches_itself_and_a_sign_flipped_permuted_copy():
    a = Autoencoder.from_config("mixed", d_model=D, layer=0, expansion=2)
    b = Autoencoder.from_config("vanilla", d_model=D, layer=0, expansion=2)
    perm = torch.randperm(a.d_features)
    with torch.no_grad():
        b.left.copy_(-a.left[perm])  # flipping l alone flips the form's sign, not the reconstruction
        b.right.copy_(a.right[perm])
    found = compare_coders(a, b, rank=4)
    assert torch.allclose(found.cosines, torch.ones(4, dtype=torch.float64))
    assert torch.allclose(found.best, torch.ones(a.d_features, dtype=torch.float64))
    assert torch.equal(perm[found.match], torch.arange(a.d_features))
    assert found.mean_best == pytest.approx(1.0)


def test_affine_and_plain_coders_compare_on_lifted_atoms():
    plain = Autoencoder.from_config("vanilla", d_model=D, layer=0, expansion=1)
    affine = Autoencoder.from_config("vanilla", d_model=D, layer=0, expansion=1, affine=True)
    with torch.no_grad():
        affine.left.copy_(plain.left)
        affine.right.copy_(plain.right)
    assert torch.allclose(compare_coders(plain, affine).best, torch.ones(D, dtype=torch.float64))
    with torch.no_grad():
        affine.left_bias.fill_(3.0)
    assert float(compare_coders(plain, affine).best.max()) < 1.0
    with pytest.raises(UsageError, match="cannot compare autoencoders of d_model 7 and 5"):
        compare_coders(plain, Autoencoder.from_config("vanilla", d_model=5, layer=0, expansion=1))


def test_compare_analysis_panels_and_needs():
    a = Autoencoder.from_config("mixed", d_model=D, layer=0, expansion=2)
    b = Autoencoder.from_config("combined", d_model=D, layer=0, expansion=3)
    settings = R.AnalysisSettings(run=["compare"], options={"compare": {"rank": 3}})
    (result,) = R.run_analyses(AnalysisSession(a, [], None, other=b), [0], settings)
    assert set(result.panels) == {
        "analysis/compare/subspace",
        "analysis/compare/latents",
        "analysis/compare/summary",
    }
    found = compare_coders(a, b, rank=3)
    assert len(result.panels["analysis/compare/subspace"].data[0].y) == 3
    assert f"mean {found.mean_best:.3f}" in result.panels["analysis/compare/latents"].layout.title.text
    assert b.config.name in result.panels["analysis/compare/summary"].html
    (skipped,) = R.run_analyses(AnalysisSession(a, [], None), [0], settings)
    assert "no second autoencoder" in skipped.skipped
    with pytest.raises(UsageError, match="analysis 'compare' cannot run: no second autoencoder"):
        R.run_analyses(AnalysisSession(a, [], None), [0], settings, strict=True)
