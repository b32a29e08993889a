"""The core issue's figures: fwd+bwd time of `coder.loss` and the largest m that fits a machine.

    python scripts/loss_figures.py                 # time at d=256, m=4096, 2048 tokens, fp32; memory model
    python scripts/loss_figures.py --check         # also run one step at the largest m and read its peak RSS

The memory model counts the float32 tensors a vanilla training step holds at its peak (inside the loss's
backward, see scripts/bench.py `paper_step_bound`): 16·N·m bytes for x̂Lᵀ, x̂Rᵀ, F and dF, the kept
upper-triangle blocks of FᵀF, LLᵀ and RRᵀ (≈ 3·m²/2 floats), two scratch blocks, and the parameters with grads.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import GIB, paper_step_bound  # noqa: E402

from bilae import Autoencoder  # noqa: E402

KINDS = ("vanilla", "ordered", "mixed", "combined")


def time_loss(kind: str, d: int, expansion: int, n: int, repeats: int) -> float:
    """Median seconds of one forward+backward of ``coder.loss`` on n random tokens."""
    bottleneck = 2 if kind in ("mixed", "combined") else None
    coder = Autoencoder.from_config(
        kind, d_model=d, layer=0, expansion=expansion, bottleneck=bottleneck, alpha=0.1
    )
    x = torch.randn(n, d)
    times = []
    for _ in range(repeats + 1):
        coder.zero_grad(set_to_none=True)
        start = time.perf_counter()
        coder.loss(x)[0].backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def largest_m(n: int, d: int, budget_gib: float, tile: int = 512) -> int:
    """The largest multiple of 1024 latents whose training step fits ``budget_gib`` by the memory model."""
    m = 1024
    while sum(paper_step_bound(n, m + 1024, d, tile).values()) / GIB <= budget_gib:
        m += 1024
    return m


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-gib", type=float, default=24.0, help="the machine's memory")
    parser.add_argument("--reserve-gib", type=float, default=1.5, help="left for Python, torch and the OS")
    parser.add_argument(
        "--check", action="store_true", help="run one step at the largest m (slow: ~N·m² FLOPs)"
    )
    args = parser.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for kind in KINDS:
        seconds = time_loss(kind, d=256, expansion=16, n=2048, repeats=args.repeats)
        print(f"loss fwd+bwd  {kind:9s} d=256 m=4096 N=2048 fp32: {seconds * 1000:8.1f} ms")

    n, d = 8192, 1024
    budget = args.memory_gib - args.reserve_gib
    m = largest_m(n, d, budget)
    model = sum(paper_step_bound(n, m, d, 512).values()) / GIB
    print(
        f"largest m at N={n}, d={d} within {budget:.1f} GiB ({args.memory_gib} − {args.reserve_gib} reserve): m={m} (model {model:.2f} GiB)"
    )
    if args.check:
        code = (
            "import sys; sys.path.insert(0, 'scripts'); from bench import paper_step; "
            f"print(paper_step({n}, {m}, {d}, 512))"
        )
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        print(
            f"check at m={m}: {done.stdout.strip() or done.stderr[-500:]} ({time.perf_counter() - start:.0f} s)"
        )


if __name__ == "__main__":
    main()
