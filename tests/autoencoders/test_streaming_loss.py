"""The streaming exact loss (streaming_loss.py): oracle values, gradients, the blocked loss, memory, loss_memory."""

from __future__ import annotations

import functools
import json
import logging
import re
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from bilae import Autoencoder, UsageError
from bilae.autoencoders import AutoencoderConfig, fast_loss, streaming_loss
from bilae.autoencoders import loss as reference
from tests.support import oracle

KINDS = {
    "vanilla": (False, False),
    "ordered": (True, False),
    "mixed": (False, True),
    "combined": (True, True),
}


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Max abs difference within ``rtol`` of the expected tensor's largest magnitude."""
    err = float((actual - expected).detach().abs().max())
    scale = float(expected.detach().abs().max())
    assert err <= rtol * scale, f"error {err:.3g} vs scale {scale:.3g}"


def problem(dtype: torch.dtype, *, n: int = 40, d: int = 6, m: int = 37, b: int | None = None, seed: int = 0):
    """Unit tokens x̂ (n, d) and parameters [L, R(, D)] that require grad."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, dtype=dtype, generator=gen)
    params = [torch.randn(m, d, dtype=dtype, generator=gen) / d**0.5 for _ in range(2)]
    if b is not None:
        params.append(torch.randn(b, m, dtype=dtype, generator=gen) / m**0.5)
    return x / x.norm(dim=1, keepdim=True), [p.requires_grad_() for p in params]


def sums_and_grads(fn, xhat: torch.Tensor, params: list[torch.Tensor], ordered: bool, **kw):
    """``(plain, train, grads of train)`` of a ``reconstruction_sums`` on the features of ``params``."""
    left, right, *rest = params
    down = rest[0] if rest else None
    f = (xhat @ left.T) * (xhat @ right.T)
    target = xhat.square().sum(-1).square()
    plain, train = fn(target, f, left, right, down, ordered=ordered, **kw)
    return [plain.detach(), train.detach(), *torch.autograd.grad(train, params)]


def coder(kind: str, loss_memory: str = "streaming", **kwargs) -> Autoencoder:
    """A float64 coder of ``kind`` (d = 6, m = 24) moved off its orthogonal initialisation."""
    bottleneck = 0.5 if KINDS[kind][1] else None
    made = Autoencoder.from_config(
        kind,
        d_model=6,
        layer=1,
        expansion=4,
        bottleneck=bottleneck,
        alpha=0.3,
        loss_memory=loss_memory,
        **kwargs,
    ).double()
    with torch.no_grad():
        for p in made.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return made


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations (3, 5, 6) with a mask; masked positions hold garbage that must not leak into the loss."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 6, generator=gen, dtype=torch.float64) * 3.0
    mask = torch.rand(3, 5, generator=gen) > 0.35
    mask[0, 0], mask[1, 1] = False, True
    x[~mask] = 1e6
    return x, mask


@pytest.fixture
def small_tile(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make coders stream in 5-wide blocks (m = 24 is not a multiple), so the tile loop really runs."""
    tiled = functools.partial(streaming_loss.reconstruction_sums, tile=5)
    monkeypatch.setattr(streaming_loss, "reconstruction_sums", tiled)


# ------------------------------------------------------------------------------------------ values
@pytest.mark.parametrize("kind", KINDS)
def test_coder_loss_equals_oracle(kind: str, small_tile: None) -> None:
    """Whole ``coder.loss`` (mask, α·scale·density) through the streaming loss against brute force, float64."""
    made = coder(kind)
    x, mask = batch()
    loss, metrics = made.loss(x, mask, scale=0.7)
    want_loss, want_mse, want_density = oracle.bilinear_loss(made, x, mask, scale=0.7)
    torch.testing.assert_close(loss, want_loss, rtol=1e-9, atol=0)
    torch.testing.assert_close(metrics["mse"], want_mse, rtol=1e-9, atol=0)
    torch.testing.assert_close(metrics["density"], want_density, rtol=1e-9, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_coder_gradients_equal_oracle(kind: str, small_tile: None) -> None:
    made = coder(kind)
    x, mask = batch(1)
    params = list(made.parameters())
    got = torch.autograd.grad(made.loss(x, mask)[0], params)
    want = torch.autograd.grad(oracle.bilinear_loss(made, x, mask)[0], params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("tile", [1, 4, 7, 36, 37, 2048])
@pytest.mark.parametrize("kind", KINDS)
def test_sums_and_gradients_equal_reference_autograd(kind: str, tile: int) -> None:
    """float64, m = 37 (a multiple of no tile but 1 and 37): values and autograd's gradients of loss.py."""
    ordered, mixing = KINDS[kind]
    xhat, params = problem(torch.float64, b=5 if mixing else None)
    want = sums_and_grads(reference.reconstruction_sums, xhat, params, ordered)
    got = sums_and_grads(streaming_loss.reconstruction_sums, xhat, params, ordered, tile=tile)
    for g, w in zip(got, want):
        assert g.dtype == torch.float64
        close(g, w, 1e-9)


@pytest.mark.parametrize("kind", KINDS)
def test_equals_blocked_float32(kind: str) -> None:
    ordered, mixing = KINDS[kind]
    xhat, params = problem(torch.float32, n=64, d=12, m=101, b=9 if mixing else None)
    want = sums_and_grads(fast_loss.reconstruction_sums, xhat, params, ordered, tile=16)
    got = sums_and_grads(streaming_loss.reconstruction_sums, xhat, params, ordered, tile=24)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        close(g, w, 1e-5)


def test_gradcheck_float64() -> None:
    """Finite differences through the custom backward, with and without a bottleneck, plain and ordered."""
    for ordered in (False, True):
        for b in (None, 3):
            xhat, params = problem(torch.float64, n=6, d=3, m=7, b=b)
            assert torch.autograd.gradcheck(functools.partial(streaming_train, xhat, ordered), tuple(params))


def streaming_train(xhat: torch.Tensor, ordered: bool, *params: torch.Tensor) -> torch.Tensor:
    """The streaming training sum in 3-wide blocks, as a function of the parameters (L, R, D)."""
    left, right, *rest = params
    f = (xhat @ left.T) * (xhat @ right.T)
    target = xhat.square().sum(-1).square()
    down = rest[0] if rest else None
    return streaming_loss.reconstruction_sums(target, f, left, right, down, ordered=ordered, tile=3)[1]


@pytest.mark.parametrize(
    "m,tile", [(1, 1), (37, 1), (37, 8), (100, 7), (4096, 2048), (3000, 1024), (64, 512)]
)
def test_block_pairs_cover_upper_triangle_once_within_tile(m: int, tile: int) -> None:
    count = torch.zeros(m, m, dtype=torch.int32)
    for rows, cols in streaming_loss.block_pairs(m, tile):
        assert rows == cols or rows[1] <= cols[0]
        assert max(rows[1] - rows[0], cols[1] - cols[0]) <= tile
        count[slice(*rows), slice(*cols)] += 1
        if rows != cols:
            count[slice(*cols), slice(*rows)] += 1
    assert bool((count == 1).all())


@pytest.mark.parametrize("kind", KINDS)
def test_affine_coders_stream_to_the_blocked_numbers(kind: str) -> None:
    """The affine variant (lifted atoms) goes through the same loss: streaming == blocked, float64."""
    made = coder(kind, loss_memory="blocked", affine=True)
    x, mask = batch(2)
    results = []
    for loss_memory in ("blocked", "streaming"):
        made.config.loss_memory = loss_memory
        loss, metrics = made.loss(x, mask)
        results.append([loss.detach(), metrics["mse"], *torch.autograd.grad(loss, list(made.parameters()))])
    for g, w in zip(*results):
        close(g, w, 1e-10)


# ------------------------------------------------------------------------------------------ memory
class LargestTensor(TorchDispatchMode):
    """Records the largest storage (in elements) any operator returns, forward and backward."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes() // t.element_size())
        return out


def memory_use(fn, kind: str, *, n: int, d: int, m: int, b: int) -> tuple[int, int]:
    """(elements saved for backward, largest tensor) of one forward + backward of ``fn``."""
    ordered, mixing = KINDS[kind]
    xhat, params = problem(torch.float32, n=n, d=d, m=m, b=b if mixing else None)
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel()
        return t

    with LargestTensor() as mode:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            sums_and_grads(fn, xhat, params, ordered)
    return saved, mode.largest


@pytest.mark.parametrize("kind", KINDS)
def test_streaming_never_holds_an_m_by_m_tensor(kind: str) -> None:
    """Deterministic accounting, no clocks or RSS: what the loss saves for backward and its largest tensor.

    The blocked loss saves ≥ 1.5 m² elements (its kept blocks; one m × m block each at this m); the streaming one
    saves only O(N·m + m·d + b·m) and no tensor it makes reaches m² elements.
    """
    n, d, m, b, tile = 24, 6, 384, 6, 40
    linear = n * m + 2 * m * d + b * m + b * b
    saved, largest = memory_use(functools.partial(streaming_loss.reconstruction_sums, tile=tile), kind,
                                n=n, d=d, m=m, b=b)  # fmt: skip
    assert saved <= 4 * linear < m * m // 2, (saved, linear)
    assert largest <= max(n * m, tile * tile, m * d, b * m) < m * m, largest
    saved, largest = memory_use(fast_loss.reconstruction_sums, kind, n=n, d=d, m=m, b=b)
    assert saved >= 1.5 * m * m and largest >= m * m, (saved, largest)


# ------------------------------------------------------------------------------------------ loss_memory
@pytest.mark.parametrize("bad", ["fast", "Streaming", "", 3, None])
def test_loss_memory_validation(bad: object) -> None:
    with pytest.raises(UsageError, match=r"loss_memory must be one of auto, blocked, streaming; got"):
        AutoencoderConfig(kind="vanilla", d_model=4, layer=0, loss_memory=bad)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=re.escape(repr(bad))):
        Autoencoder.from_config("mixed", d_model=4, layer=0, loss_memory=bad)


def test_loss_memory_never_changes_the_name_and_defaults_to_auto() -> None:
    names = {Autoencoder.from_config("ordered", d_model=4, layer=2, loss_memory=v).config.name for v in
             ("auto", "blocked", "streaming")}  # fmt: skip
    assert names == {"ordered-l02-x16-a0-b0"}
    assert Autoencoder.from_config("vanilla", d_model=4, layer=0).config.loss_memory == "auto"


class Calls:
    """Wraps a ``reconstruction_sums`` and counts its calls."""

    def __init__(self, fn) -> None:  # type: ignore[no-untyped-def]
        self.fn, self.count = fn, 0

    def __call__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.count += 1
        return self.fn(*args, **kwargs)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, Calls]:
    """Count which loss a coder calls: ``calls["blocked"].count``, ``calls["streaming"].count``."""
    spies = {
        "blocked": Calls(fast_loss.reconstruction_sums),
        "streaming": Calls(streaming_loss.reconstruction_sums),
    }
    monkeypatch.setattr(fast_loss, "reconstruction_sums", spies["blocked"])
    monkeypatch.setattr(streaming_loss, "reconstruction_sums", spies["streaming"])
    return spies


@pytest.mark.parametrize("budget,expected", [(0, "streaming"), (2**50, "blocked")])
def test_auto_picks_by_budget_and_logs_once(
    budget: int, expected: str, calls: dict[str, Calls], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    monkeypatch.setattr(streaming_loss, "memory_budget", lambda device: budget)
    made = Autoencoder.from_config("mixed", d_model=8, layer=0, expansion=2)
    x = torch.randn(10, 8)
    with caplog.at_level(logging.INFO, logger="bilae"):
        made.loss(x)
        made.loss(x)
    assert calls[expected].count == 2 and sum(c.count for c in calls.values()) == 2
    chosen = [r.getMessage() for r in caplog.records if "loss_memory=auto" in r.getMessage()]
    assert len(chosen) == 1 and f"chose the {expected} loss" in chosen[0] and made.config.name in chosen[0]


@pytest.mark.parametrize("loss_memory", ["blocked", "streaming"])
def test_explicit_choice_and_reference_switch(loss_memory: str, calls: dict[str, Calls]) -> None:
    """An explicit loss_memory is obeyed; ``coder.fast = False`` still selects the reference loss.py."""
    made = Autoencoder.from_config("combined", d_model=8, layer=0, expansion=2, loss_memory=loss_memory)
    x = torch.randn(10, 8)
    made.loss(x)
    assert calls[loss_memory].count == 1
    made.fast = False
    made.loss(x)
    assert sum(c.count for c in calls.values()) == 1


def test_memory_budget_is_a_fraction_of_available_ram() -> None:
    ram = streaming_loss.available_ram()
    assert ram > 0
    budget = streaming_loss.memory_budget(torch.device("cpu"))
    assert 0 < budget <= streaming_loss.AUTO_FRACTION * ram * 1.5  # RAM moves between the two reads
    # The blocked loss's kept blocks: 3 · (m² + m·512) / 2 floats plus two scratch blocks.
    assert streaming_loss.blocked_bytes(4096) == (3 * (4096**2 + 4096 * 512) // 2 + 2 * 2048**2) * 4


def test_checkpoint_round_trip_is_independent_of_loss_memory(tmp_path: Path) -> None:
    """Saved with one loss_memory, loaded, and with the key removed (old config.json): same weights and loss."""
    made = coder("combined", loss_memory="streaming")
    x, mask = batch()
    want = made.loss(x, mask)[0]
    folder = made.save(tmp_path / made.config.name)
    config = json.loads((folder / "config.json").read_text())
    assert config["loss_memory"] == "streaming"
    loaded = Autoencoder.load(folder)
    assert loaded.config.loss_memory == "streaming" and loaded.config.name == made.config.name
    del config["loss_memory"]
    (folder / "config.json").write_text(json.dumps(config))
    old = Autoencoder.load(folder)
    assert old.config.loss_memory == "auto" and "loss_memory" not in old.config.extra
    for loss_memory in ("auto", "blocked", "streaming"):
        old.config.loss_memory = loss_memory
        close(old.loss(x, mask)[0], want, 1e-12)
    for (name, p), q in zip(made.state_dict().items(), old.state_dict().values()):
        assert torch.equal(p, q), name
