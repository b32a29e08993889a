"""The affine variant (f = (l·x̂ + a)(r·x̂ + c)) against a brute-force oracle on the lifted input z = [1, x̂]."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from bilae import Autoencoder, AutoencoderConfig, UsageError
from tests.support import oracle

BILINEAR = ["vanilla", "ordered", "mixed", "combined"]
PATHS = ["blocked", "streaming", "reference"]
CONF = Path(__file__).resolve().parents[2] / "conf" / "autoencoder"


def make(kind: str, alpha: float = 0.3, path: str = "blocked", **kwargs) -> Autoencoder:
    """A float64 affine coder whose loss runs ``path``: blocked, streaming or the reference ``loss.py``."""
    bottleneck = 0.5 if kind in ("mixed", "combined") else None
    memory = {} if path == "reference" else {"loss_memory": path}
    coder = Autoencoder.from_config(
        kind,
        d_model=6,
        layer=1,
        expansion=2,
        bottleneck=bottleneck,
        alpha=alpha,
        affine=True,
        **memory,
        **kwargs,
    )
    coder.fast = path != "reference"
    return coder.double()


def perturb(coder: Autoencoder, seed: int = 0) -> None:
    """Move away from the initialisation (zero biases, orthogonal rows) so no identity can hide a bug."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in coder.named_parameters():
            size = 0.5 if name.endswith("bias") else 0.3
            p.add_(size * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 6, generator=gen, dtype=torch.float64) * 3.0
    mask = torch.rand(3, 5, generator=gen) > 0.35
    mask[0, 0] = False  # always at least one masked token
    mask[1, 1] = True
    x[~mask] = 1e6  # masked positions hold garbage that must not leak into the loss
    return x, mask


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", BILINEAR)
def test_loss_equals_lifted_oracle(kind: str, path: str) -> None:
    coder = make(kind, path=path)
    perturb(coder)
    x, mask = batch()
    loss, metrics = coder.loss(x, mask, scale=0.7)
    want_loss, want_mse, want_density = oracle.affine_loss(coder, x, mask, scale=0.7)
    torch.testing.assert_close(loss, want_loss, rtol=1e-9, atol=0)
    torch.testing.assert_close(metrics["mse"], want_mse, rtol=1e-9, atol=0)
    torch.testing.assert_close(metrics["density"], want_density, rtol=1e-9, atol=0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", BILINEAR)
def test_gradients_equal_lifted_oracle(kind: str, path: str) -> None:
    coder = make(kind, path=path)
    perturb(coder, seed=1)
    x, mask = batch(1)
    params = dict(coder.named_parameters())
    got = torch.autograd.grad(coder.loss(x, mask)[0], list(params.values()))
    want = torch.autograd.grad(oracle.affine_loss(coder, x, mask)[0], list(params.values()))
    expected = {"left", "right", "left_bias", "right_bias"} | ({"down"} if coder.down is not None else set())
    assert set(params) == expected
    for name, g, w in zip(params, got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12, msg=f"gradient of {name}")


@pytest.mark.parametrize("kind", BILINEAR)
def test_features_are_off_centre_products(kind: str) -> None:
    coder = make(kind)
    perturb(coder, seed=2)
    x, _ = batch(2)
    xhat = oracle.normalize(x)
    want = (xhat @ coder.left.T + coder.left_bias) * (xhat @ coder.right.T + coder.right_bias)
    torch.testing.assert_close(coder.features(x), want, rtol=1e-12, atol=1e-12)
    # The same latents as the lifted form (l'·z)(r'·z), with the atoms the coder exposes.
    left, right = coder.atoms()
    z = coder.lift(xhat)
    assert left.shape == right.shape == (12, 7) and z.shape == (3, 5, 7)
    torch.testing.assert_close(coder.features(x), (z @ left.T) * (z @ right.T), rtol=1e-12, atol=1e-12)


def test_lifted_target_norm_is_four() -> None:
    """‖z⊗z‖² = (1 + ‖x̂‖²)² = 4: with every atom zero the error is 4 per token."""
    coder = make("vanilla", alpha=0.0)
    with torch.no_grad():
        for p in coder.parameters():
            p.zero_()
    x, mask = batch(3)
    torch.testing.assert_close(coder.loss(x, mask)[1]["mse"], torch.tensor(4.0, dtype=torch.float64))


def test_zero_biases_give_the_plain_features() -> None:
    affine = make("mixed")
    plain = Autoencoder.from_config(
        "mixed", d_model=6, layer=1, expansion=2, bottleneck=0.5, alpha=0.3
    ).double()
    plain.load_state_dict({k: v for k, v in affine.state_dict().items() if not k.endswith("bias")})
    x, mask = batch(4)
    torch.testing.assert_close(affine.features(x), plain.features(x), rtol=0, atol=0)
    # The loss differs by exactly the constant part of z⊗z that nothing reconstructs: 4 − 1 = 3 per token.
    torch.testing.assert_close(affine.loss(x, mask)[1]["mse"], plain.loss(x, mask)[1]["mse"] + 3.0)


def test_affine_float32_and_half_keep_biases_in_step() -> None:
    coder = make("combined").float()
    perturb(coder, seed=5)
    x, mask = batch(5)
    loss = coder.loss(x.float(), mask)[0]
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert coder.half().left_bias.dtype == torch.float16


def test_name_config_and_parameters() -> None:
    coder = make("vanilla", tags=["demo"])
    assert coder.config.name == "vanilla-l01-x2-a30-b0-affine-demo"
    assert coder.affine and coder.left_bias.shape == (12,) and torch.all(coder.right_bias == 0)
    again = AutoencoderConfig.from_dict(coder.config.to_dict())
    assert again == coder.config and again.affine
    plain = Autoencoder.from_config("vanilla", d_model=6, layer=1, expansion=2)
    assert set(plain.state_dict()) == {"left", "right"} and not plain.affine
    assert plain.config.name == "vanilla-l01-x2-a0-b0"


def test_save_load_round_trip(tmp_path: Path) -> None:
    coder = make("ordered")
    perturb(coder, seed=6)
    loaded = Autoencoder.load(coder.save(tmp_path / coder.config.name))
    assert loaded.config == coder.config
    for name, tensor in coder.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_autoencoder_configs_name_affine(path: Path) -> None:
    options = yaml.safe_load(path.read_text())
    assert options["affine"] is False, f"{path.name} should say affine: false"
    if options["kind"] == "topk":
        return
    options["affine"] = True
    kind = options.pop("kind")
    coder = Autoencoder.from_config(kind, d_model=8, layer=0, **options)
    assert coder.affine and coder.config.name.endswith("-affine")


# ------------------------------------------------------------------------------------------ bad input
def test_affine_topk_is_refused() -> None:
    with pytest.raises(
        UsageError, match=r"topk autoencoder has no affine variant.*combined, mixed, ordered, vanilla"
    ):
        Autoencoder.from_config("topk", d_model=8, layer=0, expansion=2, affine=True)


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_affine_must_be_a_bool(value: object) -> None:
    with pytest.raises(UsageError, match=r"affine must be true or false"):
        Autoencoder.from_config("vanilla", d_model=8, layer=0, affine=value)


def test_affine_tag_is_reserved() -> None:
    with pytest.raises(UsageError, match=r"tag 'affine' is reserved.*affine=true"):
        Autoencoder.from_config("vanilla", d_model=8, layer=0, tags=["affine"])
