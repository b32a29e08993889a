"""The fast exact loss (fast_loss.py) against the reference kernel-trick loss (loss.py): values and gradients."""

from __future__ import annotations

import pytest
import torch

from bilae import Autoencoder
from bilae.autoencoders import fast_loss
from bilae.autoencoders import loss as reference

KINDS = {
    "vanilla": (False, False),
    "ordered": (True, False),
    "mixed": (False, True),
    "combined": (True, True),
}
RTOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Max abs difference within ``rtol`` of the reference's largest magnitude."""
    err = float((actual - expected).detach().abs().max())
    assert err <= rtol * float(expected.abs().max()), (
        f"error {err:.3g} vs scale {float(expected.abs().max()):.3g}"
    )


def problem(dtype: torch.dtype, *, n: int = 45, d: int = 7, m: int = 37, b: int | None = None):
    x = torch.randn(n, d, dtype=dtype)
    xhat = x / x.norm(dim=1, keepdim=True)
    params = [torch.randn(m, d, dtype=dtype) / d**0.5, torch.randn(m, d, dtype=dtype) / d**0.5]
    if b is not None:
        params.append(torch.randn(b, m, dtype=dtype) / m**0.5)
    return xhat, [p.requires_grad_() for p in params]


def sums_and_grads(fn, xhat, params, ordered: bool, **kw):
    left, right, *rest = params
    down = rest[0] if rest else None
    f = (xhat @ left.T) * (xhat @ right.T)
    target = xhat.square().sum(-1).square()
    plain, train = fn(target, f, left, right, down, ordered=ordered, **kw)
    return plain.detach(), train.detach(), torch.autograd.grad(train, params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tile", [4, 8, 64])
@pytest.mark.parametrize("kind", KINDS)
def test_sums_and_gradients_match_reference(kind: str, tile: int, dtype: torch.dtype) -> None:
    ordered, mixing = KINDS[kind]
    xhat, params = problem(dtype, b=11 if mixing else None)
    want = sums_and_grads(reference.reconstruction_sums, xhat, params, ordered)
    got = sums_and_grads(fast_loss.reconstruction_sums, xhat, params, ordered, tile=tile)
    for g, w in zip((got[0], got[1], *got[2]), (want[0], want[1], *want[2])):
        assert g.dtype == dtype
        close(g, w, RTOL[dtype])


@pytest.mark.parametrize("kind", KINDS)
def test_quadratic_terms_and_max_block(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The quadratic terms alone, with off-diagonal blocks cut into several squares (small MAX_BLOCK)."""
    monkeypatch.setattr(fast_loss, "MAX_BLOCK", 3)
    ordered, mixing = KINDS[kind]
    xhat, (left, right, *rest) = problem(torch.float64, m=29, b=6 if mixing else None)
    down = rest[0] if rest else None
    f = (xhat @ left.T) * (xhat @ right.T)
    h = f if down is None else f @ down.T
    g = h if down is None else h @ down
    k = reference.kernel(left, right)
    weighted = k * reference.prefix_matrix(k.shape[0], like=k) if ordered else k
    train, plain = fast_loss.quadratic_terms(h, left, right, down, ordered=ordered, tile=2)
    close(train, ((g @ weighted) * g).sum(), 1e-12)
    close(plain, ((g @ k) * g).sum(), 1e-12)
    assert not plain.requires_grad


@pytest.mark.parametrize("m,tile", [(1, 1), (5, 8), (37, 8), (100, 7), (4096, 512), (3000, 1024), (64, 4)])
def test_blocks_cover_upper_triangle_once(m: int, tile: int) -> None:
    count = torch.zeros(m, m, dtype=torch.int32)
    for rows, cols in fast_loss.blocks(m, tile):
        assert rows == cols or rows[1] <= cols[0]
        count[slice(*rows), slice(*cols)] += 1
        if rows != cols:
            count[slice(*cols), slice(*rows)] += 1
            assert max(rows[1] - rows[0], cols[1] - cols[0]) <= max(fast_loss.MAX_BLOCK, tile)
        else:
            assert rows[1] - rows[0] <= tile
    assert bool((count == 1).all())


def test_gradcheck_float64() -> None:
    xhat, (left, right, down) = problem(torch.float64, n=9, d=3, m=7, b=3)
    h = ((xhat @ left.T) * (xhat @ right.T)).detach().requires_grad_()
    for ordered in (False, True):
        for bottleneck in (None, down):
            inner = h if bottleneck is None else (h @ bottleneck.T).detach().requires_grad_()
            args = (inner, left, right) if bottleneck is None else (inner, left, right, bottleneck)

            def fn(*a, ordered=ordered):
                return fast_loss.quadratic_terms(
                    *a[:3], a[3] if len(a) > 3 else None, ordered=ordered, tile=3
                )[0]

            assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("kind", KINDS)
def test_coder_loss_matches_reference_path(kind: str) -> None:
    """Whole ``coder.loss`` (mask, α·scale·density) with the fast path vs ``coder.fast = False``."""
    coder = Autoencoder.from_config(kind, d_model=8, layer=0, expansion=4, alpha=0.3).double()
    x = torch.randn(3, 11, 8, dtype=torch.float64)
    mask = torch.rand(3, 11) > 0.3
    results = []
    for fast in (True, False):
        coder.fast = fast
        coder.zero_grad()
        loss, metrics = coder.loss(x, mask, scale=0.5)
        loss.backward()
        grads = [p.grad.clone() for p in coder.parameters()]
        results.append((loss.detach(), metrics, grads))
    (loss, metrics, grads), (ref_loss, ref_metrics, ref_grads) = results
    close(loss, ref_loss, 1e-10)
    assert set(metrics) == set(ref_metrics) == {"mse", "recon", "density"}
    for key in metrics:
        close(metrics[key], ref_metrics[key], 1e-10)
    for g, w in zip(grads, ref_grads):
        close(g, w, 1e-10)


def test_fast_is_default() -> None:
    assert Autoencoder.from_config("vanilla", d_model=4, layer=0).fast


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_autocast_cpu(kind: str) -> None:
    """Under bf16 autocast the loss and the m² reductions stay fp32: close to the fp32 reference loss."""
    coder = Autoencoder.from_config(kind, d_model=16, layer=0, expansion=4)
    x = torch.randn(64, 16)
    coder.fast = False
    want, _ = coder.loss(x)
    coder.fast = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, metrics = coder.loss(x)
    assert got.dtype == torch.float32 and metrics["mse"].dtype == torch.float32
    got.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in coder.parameters())
    assert all(bool(torch.isfinite(p.grad).all()) for p in coder.parameters())
    assert abs(float(got) - float(want)) <= 3e-2 * abs(float(want))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["vanilla", "combined"])
def test_torch_compile(kind: str) -> None:
    ordered, mixing = KINDS[kind]
    xhat, params = problem(torch.float32, n=20, d=4, m=12, b=3 if mixing else None)

    def step(xhat, *params):
        left, right, *rest = params
        f = (xhat @ left.T) * (xhat @ right.T)
        target = xhat.square().sum(-1).square()
        down = rest[0] if rest else None
        return fast_loss.reconstruction_sums(target, f, left, right, down, ordered=ordered, tile=4)[1]

    compiled = torch.compile(step, backend="inductor", fullgraph=False)
    want = step(xhat, *params)
    got = compiled(xhat, *params)
    close(got, want, 1e-5)
    for g, w in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params)):
        close(g, w, 1e-5)
