"""The composite atlas (low-rank and direct paths) against full eigendecompositions of B_k."""

import pytest
import torch

from bilae import Autoencoder, UsageError
from bilae.analysis import composite_atlas, composite_form, spectrum


def full_stats(left, right, down):
    """Brute force: build every B_k (d×d), eigvalsh, and the statistics from all d eigenvalues."""
    rank, energy, captured, top = [], [], [], []
    for row in down:
        b = left.T @ torch.diag(row) @ right
        lam = torch.linalg.eigvalsh((b + b.T) / 2)
        a = lam.abs()
        order = a.argsort(descending=True)
        rank.append(a.sum() ** 2 / (lam**2).sum())
        energy.append((lam**2).sum())
        captured.append(a[order[:3]].sum() / a.sum())
        top.append(lam[order[:3]])
    energy = torch.stack(energy)
    return torch.stack(rank), energy / energy.mean(), torch.stack(captured), torch.stack(top)


def sparse_weights(m=48, b=12, d=16, max_support=12):
    left, right = torch.randn(m, d, dtype=torch.float64), torch.randn(m, d, dtype=torch.float64)
    down = torch.zeros(b, m, dtype=torch.float64)
    for k in range(b):
        s = 1 + k % max_support
        down[k, torch.randperm(m)[:s]] = torch.randn(s, dtype=torch.float64)
    return left, right, down


@pytest.mark.parametrize("batch", [1, 5, 256])
def test_lowrank_atlas_equals_full_eigendecomposition(batch):
    left, right, down = sparse_weights()  # supports 1..12 < d/2 = 8 for some, >= 8 for others: both paths
    atlas = composite_atlas((left, right, down), tol=0.0, batch=batch)
    rank, importance, captured, top = full_stats(left, right, down)
    assert torch.allclose(atlas.rank, rank)
    assert torch.allclose(atlas.importance, importance)
    assert torch.allclose(atlas.captured, captured)
    assert torch.allclose(atlas.top.abs(), top.abs())
    assert torch.allclose(atlas.top, top, atol=1e-10) or torch.allclose(
        atlas.top.sort().values, top.sort().values
    )
    assert atlas.support.tolist() == [1 + k % 12 for k in range(12)]
    assert atlas.importance.mean().item() == pytest.approx(1.0)


def test_only_lowrank_path_matches_on_wide_model():
    left, right, down = sparse_weights(m=200, b=20, d=64, max_support=20)  # all supports < 32: low-rank only
    atlas = composite_atlas((left, right, down), tol=0.0, batch=3)
    rank, importance, captured, _ = full_stats(left, right, down)
    assert torch.allclose(atlas.rank, rank) and torch.allclose(atlas.captured, captured)
    assert torch.allclose(atlas.importance, importance)


def test_dense_rows_use_direct_path():
    left, right = torch.randn(30, 6, dtype=torch.float64), torch.randn(30, 6, dtype=torch.float64)
    down = torch.randn(4, 30, dtype=torch.float64)  # support 30 >= d/2
    atlas = composite_atlas((left, right, down), tol=0.0)
    rank, importance, captured, _ = full_stats(left, right, down)
    assert torch.allclose(atlas.rank, rank) and torch.allclose(atlas.captured, captured)
    assert torch.allclose(atlas.importance, importance)


def test_tolerance_drops_small_entries_and_empty_rows_are_zero():
    left, right = torch.randn(10, 8, dtype=torch.float64), torch.randn(10, 8, dtype=torch.float64)
    down = torch.zeros(3, 10, dtype=torch.float64)
    down[0, [1, 2, 3]] = torch.tensor([1.0, 0.5, 1e-6], dtype=torch.float64)
    down[2, 4] = -2.0
    atlas = composite_atlas((left, right, down), tol=1e-3)
    assert atlas.support.tolist() == [2, 0, 1]
    truncated = down.clone()
    truncated[0, 3] = 0
    rank, _, captured, _ = full_stats(left, right, truncated[[0, 2]])
    assert torch.allclose(atlas.rank[[0, 2]], rank) and torch.allclose(atlas.captured[[0, 2]], captured)
    assert atlas.rank[1] == 0 and atlas.captured[1] == 0 and atlas.importance[1] == 0
    # -2 (l rᵀ + r lᵀ)/2 has the two eigenvalues -(l·r ± ‖l‖‖r‖)
    lv, rv = left[4], right[4]
    lam = -(lv @ rv + torch.tensor([1.0, -1.0], dtype=torch.float64) * lv.norm() * rv.norm())
    assert atlas.rank[2].item() == pytest.approx((lam.abs().sum() ** 2 / (lam**2).sum()).item())
    assert atlas.captured[2].item() == pytest.approx(1.0)


def test_atlas_of_a_coder_and_composite_form():
    coder = Autoencoder.from_config("mixed", d_model=8, layer=0, expansion=2).double()
    atlas = composite_atlas(coder, tol=0.0)
    left, right, down = coder.left.detach(), coder.right.detach(), coder.down.detach()
    rank, importance, captured, _ = full_stats(left, right, down)
    assert torch.allclose(atlas.rank, rank) and torch.allclose(atlas.importance, importance)
    form = composite_form(coder, 3)
    b = left.T @ torch.diag(down[3]) @ right
    assert torch.allclose(form.matrix, (b + b.T) / 2)
    assert torch.allclose(spectrum(form.matrix).eigenvalues[:3], atlas.top[3])


def test_atlas_errors():
    with pytest.raises(UsageError, match="'mixed' or 'combined'"):
        composite_atlas(Autoencoder.from_config("ordered", d_model=4, layer=0, expansion=2))
    coder = Autoencoder.from_config("mixed", d_model=4, layer=0, expansion=2)
    with pytest.raises(UsageError, match=r"bottleneck row 8 is out of range; valid: 0 to 7"):
        composite_form(coder, 8)
    with pytest.raises(UsageError, match="tol"):
        composite_atlas(coder, tol=1.5)
    with pytest.raises(UsageError, match=r"down \(b, m\)"):
        composite_atlas((torch.randn(5, 3), torch.randn(5, 3), torch.randn(2, 4)))


@pytest.mark.slow
def test_benchmark_script_runs_quick():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[2] / "scripts" / "bench_atlas.py"
    out = subprocess.run(
        [sys.executable, str(script), "--quick", "--sample", "2"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "SUMMARY" in out.stdout and "extrapolated from 2 rows" in out.stdout
