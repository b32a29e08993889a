"""The bilinear kinds' loss, gradients and density against brute-force oracles (float64)."""

from __future__ import annotations

import pytest
import torch

from bilae import Autoencoder
from tests.support import oracle

BILINEAR = ["vanilla", "ordered", "mixed", "combined"]


def make(kind: str, alpha: float = 0.3, **kwargs) -> Autoencoder:
    bottleneck = 0.5 if kind in ("mixed", "combined") else None
    coder = Autoencoder.from_config(
        kind, d_model=6, layer=1, expansion=2, bottleneck=bottleneck, alpha=alpha, **kwargs
    )
    return coder.double()


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 6, generator=gen, dtype=torch.float64) * 3.0
    mask = torch.rand(3, 5, generator=gen) > 0.35
    mask[0, 0] = False  # always at least one masked token
    mask[1, 1] = True
    # Masked positions hold garbage that must not leak into the loss.
    x[~mask] = 1e6
    return x, mask


def perturb(coder: Autoencoder) -> None:
    """Move away from the orthogonal initialisation so no identity can hide a bug."""
    with torch.no_grad():
        for p in coder.parameters():
            p.add_(0.3 * torch.randn_like(p))


@pytest.mark.parametrize("kind", BILINEAR)
def test_loss_and_mse_equal_oracle(kind: str) -> None:
    coder = make(kind)
    perturb(coder)
    x, mask = batch()
    loss, metrics = coder.loss(x, mask, scale=0.7)
    want_loss, want_mse, want_density = oracle.bilinear_loss(coder, x, mask, scale=0.7)
    torch.testing.assert_close(loss, want_loss, rtol=1e-9, atol=0)
    torch.testing.assert_close(metrics["mse"], want_mse, rtol=1e-9, atol=0)
    torch.testing.assert_close(metrics["density"], want_density, rtol=1e-9, atol=0)


@pytest.mark.parametrize("kind", BILINEAR)
def test_gradients_equal_oracle(kind: str) -> None:
    coder = make(kind)
    perturb(coder)
    x, mask = batch(1)
    params = dict(coder.named_parameters())
    got = torch.autograd.grad(coder.loss(x, mask)[0], list(params.values()))
    want = torch.autograd.grad(oracle.bilinear_loss(coder, x, mask)[0], list(params.values()))
    assert set(params) == ({"left", "right", "down"} if coder.down is not None else {"left", "right"})
    for name, g, w in zip(params, got, want):
        torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-12, msg=f"gradient of {name}")


@pytest.mark.parametrize("kind", ["vanilla", "mixed"])
def test_alpha_zero_loss_is_mse(kind: str) -> None:
    coder = make(kind, alpha=0.0)
    perturb(coder)
    x, mask = batch(2)
    loss, metrics = coder.loss(x, mask)
    assert loss.item() == metrics["mse"].item()
    f = coder.features(x[mask])
    torch.testing.assert_close(metrics["density"], oracle.hoyer(f).mean(), rtol=1e-12, atol=0)


def test_scale_multiplies_alpha() -> None:
    coder = make("vanilla", alpha=0.5)
    x, mask = batch()
    loss0, metrics = coder.loss(x, mask, scale=0.0)
    loss1, _ = coder.loss(x, mask, scale=1.0)
    torch.testing.assert_close(loss0, metrics["mse"])
    torch.testing.assert_close(loss1 - loss0, 0.5 * metrics["density"])


def test_features_normalise_and_keep_shape() -> None:
    coder = make("mixed")
    x, _ = batch()
    f = coder.features(x)
    assert f.shape == (3, 5, 12)
    torch.testing.assert_close(coder(x * 7.0), f)
    xhat = oracle.normalize(x)
    torch.testing.assert_close(f, (xhat @ coder.left.T) * (xhat @ coder.right.T))


def test_orthogonal_initialisation() -> None:
    coder = Autoencoder.from_config("mixed", d_model=8, layer=0, expansion=4, bottleneck=2)
    eye = torch.eye(8)
    torch.testing.assert_close(coder.left.T @ coder.left, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(coder.right.T @ coder.right, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(coder.down @ coder.down.T, torch.eye(16), atol=1e-5, rtol=0)


def test_loss_memory_is_independent_of_d_squared_per_token() -> None:
    """The loss must never build per-token d×d tensors: trace every saved tensor's size."""
    coder = Autoencoder.from_config("combined", d_model=64, layer=0, expansion=2, bottleneck=1)
    n, d, m = 300, 64, 128
    x = torch.randn(n, d)
    largest = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal largest
        largest = max(largest, t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        coder.loss(x)[0].backward()
    assert largest <= max(n * m, m * m), largest
    assert largest < n * d * d


def test_topk_errors_in_x_and_product_space() -> None:
    coder = Autoencoder.from_config("topk", d_model=6, layer=0, expansion=2, k=3).double()
    perturb(coder)
    x, mask = batch()
    loss, metrics = coder.loss(x, mask)
    xhat = oracle.normalize(x[mask])
    z = coder.features(x[mask])
    assert ((z != 0).sum(-1) <= 3).all()
    recon = z @ coder.decoder + coder.decoder_bias
    want_x = (xhat - recon).square().sum(-1).mean()
    outer = torch.einsum("ni,nj->nij", xhat, xhat) - torch.einsum("ni,nj->nij", recon, recon)
    want_product = outer.square().sum((-1, -2)).mean()
    torch.testing.assert_close(metrics["mse_x"], want_x, rtol=1e-12, atol=0)
    torch.testing.assert_close(metrics["mse"], want_product, rtol=1e-10, atol=0)
    torch.testing.assert_close(loss, want_x + coder.config.alpha * metrics["density"])


def test_half_and_to_keep_working() -> None:
    coder = make("mixed").half()
    assert coder.left.dtype == torch.float16
    assert coder.features(torch.randn(2, 6)).dtype == torch.float16
    coder = coder.to(torch.float32)
    assert coder.loss(torch.randn(4, 6))[0].dtype == torch.float32
