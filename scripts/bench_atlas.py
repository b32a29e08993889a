"""Benchmark the composite atlas (low-rank 2s×2s path) against full d×d eigendecompositions.

    python scripts/bench_atlas.py            # paper size: d=1024, x16 (m=16384), bottleneck 2 (b=2048)
    python scripts/bench_atlas.py --quick    # tiny sizes, a few seconds

Random L, R and a D with 16–32 non-zeros per row. The full path is timed on a sample of rows and extrapolated
to all b rows (printed as such); its statistics are checked against the atlas on those rows.
"""

from __future__ import annotations

import argparse
import time

import torch

from bilae.analysis.composites import composite_atlas, direct_eigenvalues, spectrum_stats, support_mask


def random_weights(m: int, b: int, d: int, nnz: tuple[int, int], seed: int = 0):
    """L, R (m×d) and a sparse D (b×m) with nnz[0]..nnz[1] non-zeros per row."""
    gen = torch.Generator().manual_seed(seed)
    left = torch.randn(m, d, generator=gen) / d**0.5
    right = torch.randn(m, d, generator=gen) / d**0.5
    down = torch.zeros(b, m)
    counts = torch.randint(nnz[0], nnz[1] + 1, (b,), generator=gen)
    for k, c in enumerate(counts.tolist()):
        cols = torch.randperm(m, generator=gen)[:c]
        down[k, cols] = torch.randn(c, generator=gen)
    return left, right, down


def time_full(left, right, down, rows: torch.Tensor, tol: float):
    """Seconds per row of the direct path (build B_k, d×d eigvalsh), and its statistics."""
    mask = support_mask(down[rows], tol)
    idx = [m.nonzero().flatten() for m in mask]
    w = [down[r, i] for r, i in zip(rows, idx)]
    direct_eigenvalues(left, right, idx[0][None], w[0][None])  # warm-up (LAPACK initialisation)
    start = time.perf_counter()
    eig = torch.stack([direct_eigenvalues(left, right, i[None], x[None])[0] for i, x in zip(idx, w)])
    return (time.perf_counter() - start) / len(rows), spectrum_stats(eig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (d=64, m=1024, b=128)")
    parser.add_argument("--sample", type=int, default=16, help="rows timed on the full d×d path")
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    args = parser.parse_args()
    d, expansion, bottleneck = (64, 16, 2) if args.quick else (1024, 16, 2)
    m, b = d * expansion, d * bottleneck
    dtype = getattr(torch, args.dtype)
    left, right, down = (t.to(dtype) for t in random_weights(m, b, d, (16, 32)))
    print(
        f"d={d} m={m} b={b} dtype={args.dtype} threads={torch.get_num_threads()} D: 16-32 non-zeros per row"
    )

    composite_atlas((left[:64], right[:64], down[:4, :64]), tol=0.0, dtype=dtype)  # warm-up
    start = time.perf_counter()
    atlas = composite_atlas((left, right, down), tol=0.0, dtype=dtype)
    atlas_s = time.perf_counter() - start
    print(f"atlas (low-rank, all {b} rows): {atlas_s:.2f} s")

    rows = torch.randperm(b, generator=torch.Generator().manual_seed(1))[: args.sample]
    per_row, (rank, energy, captured, _) = time_full(left, right, down, rows, tol=0.0)
    full_s = per_row * b
    print(
        f"full d×d path: {per_row:.3f} s/row, measured on {len(rows)} rows -> EXTRAPOLATED to {b} rows: {full_s:.1f} s"
    )
    err = max(
        (atlas.rank[rows] - rank).abs().max().item(), (atlas.captured[rows] - captured).abs().max().item()
    )
    print(f"max |difference| of rank/captured on the sampled rows: {err:.2e}")
    print(
        f"SUMMARY d={d} m={m} b={b}: atlas {atlas_s:.2f} s, full path ~{full_s:.0f} s "
        f"(extrapolated from {len(rows)} rows), speedup ~{full_s / atlas_s:.0f}x"
    )


if __name__ == "__main__":
    main()
