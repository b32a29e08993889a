"""Overlaps, GED and participation ratio against direct computations; chunked equals unchunked."""

import pytest
import torch

from bilae import Autoencoder, UsageError
from bilae.analysis import (
    generalized_effective_dimension,
    overlap_chunks,
    overlap_matrix,
    overlap_rows,
    overlap_stats,
    participation_ratio,
)


@pytest.fixture
def coder():
    return Autoencoder.from_config("mixed", d_model=8, layer=1, expansion=4).double()


def test_ged_and_participation_match_formulas():
    v = torch.tensor([0.5, -1.0, 0.0, 0.25], dtype=torch.float64)
    a = v.abs()
    assert generalized_effective_dimension(v).item() == pytest.approx(
        (a**4).sum().item() ** 2 / (a**8).sum().item()
    )
    assert participation_ratio(v).item() == pytest.approx(a.sum().item() ** 2 / (v**2).sum().item())
    # n equal entries count as n
    assert generalized_effective_dimension(torch.ones(7)).item() == pytest.approx(7)
    assert participation_ratio(-torch.ones(5)).item() == pytest.approx(5)


def test_ged_of_zero_vector_is_zero_and_scale_invariant():
    assert generalized_effective_dimension(torch.zeros(4)).item() == 0
    assert participation_ratio(torch.zeros(4)).item() == 0
    v = torch.randn(3, 10, dtype=torch.float64)
    assert torch.allclose(generalized_effective_dimension(1e-30 * v), generalized_effective_dimension(v))


def test_overlap_matrix_is_normalised_gram(coder):
    d = coder.down.detach()
    unit = d / d.norm(dim=0)
    g = overlap_matrix(coder)
    assert g.shape == (32, 32)
    assert torch.allclose(g, unit.T @ unit)
    assert torch.allclose(g.diagonal(), torch.ones(32, dtype=g.dtype))


def test_rows_and_chunks_equal_full(coder):
    g = overlap_matrix(coder)
    assert torch.allclose(overlap_rows(coder, [3, 0, 31]), g[[3, 0, 31]])
    blocks = list(overlap_chunks(coder, chunk=5))
    assert [start for start, _ in blocks] == list(range(0, 32, 5))
    assert torch.allclose(torch.cat([b for _, b in blocks]), g)


@pytest.mark.parametrize("chunk", [1, 7, 32, 100])
def test_chunked_stats_equal_unchunked(coder, chunk):
    g = overlap_matrix(coder)
    stats = overlap_stats(coder, chunk=chunk)
    assert torch.allclose(stats.ged, generalized_effective_dimension(g))
    assert torch.allclose(stats.participation, participation_ratio(g))
    assert stats.ged.shape == (32,)


def test_accepts_a_bare_matrix():
    down = torch.randn(4, 9)
    unit = down / down.norm(dim=0)
    assert torch.allclose(overlap_matrix(down), unit.T @ unit, atol=1e-6)
    assert overlap_stats(down, chunk=2).ged.shape == (9,)


@pytest.mark.parametrize("kind", ["vanilla", "ordered"])
def test_kind_without_bottleneck_names_mixed_and_combined(kind):
    coder = Autoencoder.from_config(kind, d_model=8, layer=1, expansion=2)
    with pytest.raises(UsageError, match=rf"'{kind}'.*no bottleneck.*'mixed' or 'combined'"):
        overlap_stats(coder)
    with pytest.raises(UsageError, match="'mixed' or 'combined'"):
        overlap_rows(coder, [0])


def test_topk_kind_has_no_overlaps():
    coder = Autoencoder.from_config("topk", d_model=8, layer=1, expansion=2, k=2)
    with pytest.raises(UsageError, match="'topk'.*'mixed' or 'combined'"):
        overlap_matrix(coder)


def test_index_out_of_range_names_valid_range(coder):
    with pytest.raises(UsageError, match=r"feature index 32 is out of range; valid: 0 to 31"):
        overlap_rows(coder, [1, 32])
    with pytest.raises(UsageError, match=r"-1 is out of range"):
        overlap_rows(coder, -1)


def test_bad_chunk_is_an_error(coder):
    with pytest.raises(UsageError, match="chunk"):
        overlap_stats(coder, chunk=0)
