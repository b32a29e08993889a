"""The Python API refuses bad values with one clear UsageError naming the value (no traceback from deep inside)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bilae import Autoencoder, UsageError
from bilae import builders as B
from tests.support.configs import train_cfg


def test_load_refuses_an_integer_dtype(tmp_path: Path) -> None:
    Autoencoder.from_config("mixed", d_model=8, layer=0, expansion=2, bottleneck=1).save(tmp_path / "c")
    with pytest.raises(UsageError, match=r"dtype must be a floating torch dtype.*torch.int32"):
        Autoencoder.load(tmp_path / "c", dtype=torch.int32)
    assert Autoencoder.load(tmp_path / "c", dtype=torch.float64).left.dtype == torch.float64


def test_features_refuse_numpy_arrays_and_integer_tensors() -> None:
    coder = Autoencoder.from_config("vanilla", d_model=8, layer=0, expansion=2)
    with pytest.raises(UsageError, match=r"must be a torch.Tensor, got ndarray.*torch.as_tensor"):
        coder.features(np.ones((3, 8), dtype=np.float32))  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=r"floating point, got dtype torch.int64"):
        coder.loss(torch.ones(3, 8, dtype=torch.long))
    assert coder.features(torch.as_tensor(np.ones((3, 8), dtype=np.float32))).shape == (3, 16)


@pytest.mark.parametrize("bottleneck", [float("inf"), float("nan"), "two", True])
def test_bottleneck_must_be_a_finite_number(bottleneck: object) -> None:
    with pytest.raises(UsageError, match=r"bottleneck must be a finite number"):
        Autoencoder.from_config("mixed", d_model=8, layer=0, bottleneck=bottleneck)  # type: ignore[arg-type]


def test_an_expansion_that_cannot_be_allocated_says_how_much_it_needs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(B, "available_ram", lambda: 2**30)  # 1 GiB
    cfg = train_cfg(tmp_path, "autoencoder.expansion=8192")
    with pytest.raises(
        UsageError,
        match=r"expansion=8192 at d_model 64 means 524,288 latents.*need about 1\.\d GiB.*1\.0 GiB",
    ):
        B.build_coders(cfg, d_model=64)
    assert len(B.build_coders(train_cfg(tmp_path), d_model=64)) == 1
