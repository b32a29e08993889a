"""The core issue's figures: fwd+bwd time of `coder.loss` and the largest m that fits a machine, for both losses.

    python scripts/loss_figures.py                     # time at d=256, m=4096, 2048 tokens, fp32; memory models
    python scripts/loss_figures.py --check             # also run one blocked step at its largest m (peak RSS)
    python scripts/loss_figures.py --check-streaming   # one streaming step at N=1024 and its largest m (peak RSS)
    python scripts/loss_figures.py --skip-timing ...   # memory models (and checks) only

The memory models count the float32 tensors a vanilla training step holds at its peak (scripts/bench.py):
the blocked loss (`paper_step_bound`) peaks inside its backward, with 16·N·m bytes for x̂Lᵀ, x̂Rᵀ, F and dF, the
kept upper-triangle blocks of FᵀF, LLᵀ and RRᵀ (≈ 3·m²/2 floats), two scratch blocks, and the parameters with
grads; the streaming loss (`streaming_step_bound`) keeps no m² block and peaks in the features' backward with
20·N·m bytes (x̂Lᵀ, x̂Rᵀ, dF and its two products) and the parameters with grads (inside its own backward it holds
16·N·m bytes and five tile² scratch blocks).
The streaming check runs at N=1024, not 8192: it confirms the m-dependent terms (at N=8192 the same m needs
the model's full budget, more than this machine has to spare beside its other work).
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
from bench import GIB, largest_m, paper_step_bound, run_loss_step, streaming_step_bound  # noqa: E402

from bilae import Autoencoder  # noqa: E402
from bilae.autoencoders import fast_loss, streaming_loss  # noqa: E402

KINDS = ("vanilla", "ordered", "mixed", "combined")
MODELS = {
    "blocked": (paper_step_bound, fast_loss.DEFAULT_TILE),
    "streaming": (streaming_step_bound, streaming_loss.DEFAULT_TILE),
}


def time_loss(kind: str, d: int, expansion: int, n: int, repeats: int, loss_memory: str = "blocked") -> float:
    """Median seconds of one forward+backward of ``coder.loss`` on n random tokens."""
    bottleneck = 2 if kind in ("mixed", "combined") else None
    coder = Autoencoder.from_config(
        kind,
        d_model=d,
        layer=0,
        expansion=expansion,
        bottleneck=bottleneck,
        alpha=0.1,
        loss_memory=loss_memory,
    )
    x = torch.randn(n, d)
    times = []
    for _ in range(repeats + 1):
        coder.zero_grad(set_to_none=True)
        start = time.perf_counter()
        coder.loss(x)[0].backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def check_blocked(n: int, m: int, d: int) -> None:
    """One blocked step at the model's largest m, in a fresh process (the bench's paper step)."""
    code = (
        "import sys; sys.path.insert(0, 'scripts'); from bench import paper_step; "
        f"print(paper_step({n}, {m}, {d}, {fast_loss.DEFAULT_TILE}))"
    )
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    print(
        f"check at m={m}: {done.stdout.strip() or done.stderr[-500:]} ({time.perf_counter() - start:.0f} s)"
    )


def check_streaming(n: int, m: int, d: int) -> None:
    """One streaming step at N=n and the streaming model's largest m, in a fresh process; its peak RSS."""
    bound, tile = MODELS["streaming"]
    model = sum(bound(n, m, d, tile).values()) / GIB
    start = time.perf_counter()
    step = run_loss_step("streaming", n, m, d)
    print(
        f"streaming check N={n} m={m} d={d}: peak RSS {step['peak_rss_gib']:.2f} GiB, {step['step_gib']:.2f} GiB "
        f"above the inputs (model at N={n}: {model:.2f} GiB incl. inputs), step {step['seconds']:.0f} s "
        f"({time.perf_counter() - start:.0f} s with start-up)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-gib", type=float, default=24.0, help="the machine's memory")
    parser.add_argument("--reserve-gib", type=float, default=1.5, help="left for Python, torch and the OS")
    parser.add_argument("--skip-timing", action="store_true", help="only the memory models (and checks)")
    parser.add_argument(
        "--check", action="store_true", help="run one blocked step at its largest m (slow: ~N·m² FLOPs)"
    )
    parser.add_argument(
        "--check-streaming",
        action="store_true",
        help="run one streaming step at N=1024 and its largest m (slow: ~12·m²·d FLOPs, about an hour on 2 cores)",
    )
    args = parser.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if not args.skip_timing:
        for kind in KINDS:
            seconds = time_loss(kind, d=256, expansion=16, n=2048, repeats=args.repeats)
            print(f"loss fwd+bwd  {kind:9s} d=256 m=4096 N=2048 fp32: {seconds * 1000:8.1f} ms")

    n, d = 8192, 1024
    budget = args.memory_gib - args.reserve_gib
    largest = {}
    for loss, (bound, tile) in MODELS.items():
        largest[loss] = largest_m(bound, n, d, budget, tile)
        model = sum(bound(n, largest[loss], d, tile).values()) / GIB
        print(
            f"largest m at N={n}, d={d} within {budget:.1f} GiB ({args.memory_gib} − {args.reserve_gib} reserve), "
            f"{loss} loss: m={largest[loss]} (model {model:.2f} GiB)"
        )
    if args.check:
        check_blocked(n, largest["blocked"], d)
    if args.check_streaming:
        check_streaming(1024, largest["streaming"], d)


if __name__ == "__main__":
    main()
