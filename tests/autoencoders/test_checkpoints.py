"""Checkpoints: the published layout, round trips, names, dtypes and clear errors for bad files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bilae import Autoencoder, CheckpointError, UsageError


def published(root: Path, name: str = "mixed-l18-x16-a20-b0", d: int = 8) -> Path:
    """A checkpoint as published: config.json with extra keys, safetensors with only left/right/down."""
    folder = root / name
    folder.mkdir(parents=True)
    config = {
        "layer": 18, "d_model": d, "expansion": 4, "bottleneck": 2, "alpha": 0.2, "beta": 0.0,
        "kind": "mixed", "tags": [], "n_ctx": 256, "transformers_version": "4.51.0", "_name_or_path": "x",
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    gen = torch.Generator().manual_seed(1)
    tensors = {
        "left": torch.randn(4 * d, d, generator=gen),
        "right": torch.randn(4 * d, d, generator=gen),
        "down": torch.randn(2 * d, 4 * d, generator=gen),
    }
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def test_published_layout_loads(tmp_path: Path) -> None:
    folder = published(tmp_path)
    coder = Autoencoder.load(folder)
    assert coder.kind == "mixed" and coder.config.layer == 18 and coder.config.d_bottleneck == 16
    assert coder.config.extra["n_ctx"] == 256
    from safetensors.torch import load_file

    torch.testing.assert_close(
        coder.down.data, load_file(folder / "model.safetensors")["down"], rtol=0, atol=0
    )
    again = Autoencoder.from_pretrained(tmp_path, "mixed-l18-x16-a20-b0")
    for name, tensor in coder.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name])


@pytest.mark.parametrize("kind", ["vanilla", "ordered", "mixed", "combined", "topk"])
def test_save_load_round_trip_is_exact(tmp_path: Path, kind: str) -> None:
    coder = Autoencoder.from_config(kind, d_model=8, layer=3, expansion=2, alpha=0.1, tags=["demo"], k=4)
    folder = coder.save(tmp_path / coder.config.name)
    loaded = Autoencoder.load(folder)
    assert type(loaded) is type(coder)
    assert loaded.config == coder.config
    for name, tensor in coder.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    x = torch.randn(5, 8)
    assert torch.equal(coder.features(x), loaded.features(x))
    assert not list(tmp_path.rglob("*.tmp")), "temporary files left behind"
    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.safetensors", "config.json"):  # the usual permissions, not mkstemp's 0600
        assert (folder / name).stat().st_mode & 0o777 == 0o666 & ~umask


def test_extra_keys_survive_a_round_trip(tmp_path: Path) -> None:
    coder = Autoencoder.load(published(tmp_path))
    coder.save(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    assert saved["n_ctx"] == 256 and saved["transformers_version"] == "4.51.0"


def test_dtype_is_preserved_or_chosen(tmp_path: Path) -> None:
    coder = Autoencoder.from_config("vanilla", d_model=8, layer=0, expansion=2).half()
    coder.save(tmp_path / "half")
    assert Autoencoder.load(tmp_path / "half").left.dtype == torch.float16
    assert Autoencoder.load(tmp_path / "half", dtype=torch.float32).left.dtype == torch.float32


def test_name_follows_published_convention() -> None:
    coder = Autoencoder.from_config("mixed", d_model=16, layer=18, expansion=16, alpha=0.2)
    assert coder.config.name == "mixed-l18-x16-a20-b0"
    coder = Autoencoder.from_config("vanilla", d_model=16, layer=3, expansion=8, alpha=1.0, tags=["2"])
    assert coder.config.name == "vanilla-l03-x8-a100-b0-2"


# ------------------------------------------------------------------------------------------ bad input
def test_unknown_kind_names_valid_kinds() -> None:
    with pytest.raises(UsageError, match=r"unknown autoencoder kind 'mixd'.*'combined'.*'mixed'.*'vanilla'"):
        Autoencoder.from_config("mixd", d_model=8, layer=0)


def test_unknown_option_is_refused() -> None:
    with pytest.raises(UsageError, match=r"unknown autoencoder option 'expnasion'"):
        Autoencoder.from_config("vanilla", d_model=8, layer=0, expnasion=4)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"does not exist.*config.json"):
        Autoencoder.load(tmp_path / "nope")


def test_missing_file(tmp_path: Path) -> None:
    folder = published(tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model.safetensors is missing"):
        Autoencoder.load(folder)


def test_missing_name_in_local_repo(tmp_path: Path) -> None:
    published(tmp_path)
    with pytest.raises(CheckpointError, match=r"no checkpoint named 'mixed-l03'.*mixed-l18-x16-a20-b0"):
        Autoencoder.from_pretrained(tmp_path, "mixed-l03")


def test_truncated_safetensors(tmp_path: Path) -> None:
    folder = published(tmp_path)
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"model.safetensors are corrupt or truncated"):
        Autoencoder.load(folder)


def test_corrupt_config(tmp_path: Path) -> None:
    folder = published(tmp_path)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config.json is not valid JSON"):
        Autoencoder.load(folder)


def test_config_without_d_model(tmp_path: Path) -> None:
    folder = published(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    del config["d_model"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match=r"config.json has no d_model"):
        Autoencoder.load(folder)


def test_shape_mismatch(tmp_path: Path) -> None:
    folder = published(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["expansion"] = 8
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"tensor 'left' has shape \(32, 8\).*needs \(64, 8\)"):
        Autoencoder.load(folder)


def test_wrong_tensors(tmp_path: Path) -> None:
    folder = published(tmp_path)
    save_file({"left": torch.zeros(32, 8)}, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"holds tensors \['left'\].*needs \['down', 'left', 'right'\]"):
        Autoencoder.load(folder)


def test_wrong_input_dimension() -> None:
    coder = Autoencoder.from_config("vanilla", d_model=8, layer=0, expansion=2)
    with pytest.raises(UsageError, match=r"shape \(4, 7\).*d_model=8"):
        coder.features(torch.randn(4, 7))
    with pytest.raises(UsageError, match=r"shape \(4, 7\).*d_model=8"):
        coder.loss(torch.randn(4, 7))


def test_all_masked_batch() -> None:
    coder = Autoencoder.from_config("mixed", d_model=8, layer=0, expansion=2)
    with pytest.raises(UsageError, match=r"no real tokens"):
        coder.loss(torch.randn(2, 3, 8), torch.zeros(2, 3, dtype=torch.bool))


def test_bottleneck_on_a_kind_without_one() -> None:
    with pytest.raises(UsageError, match=r"vanilla autoencoder has no bottleneck.*mixed"):
        Autoencoder.from_config("vanilla", d_model=8, layer=0, bottleneck=2)


def test_hub_unreachable_gives_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        CheckpointError, match=r"could not fetch mixed-l18-x16-a20-b0/config.json.*local directory"
    ):
        Autoencoder.from_pretrained("tdooms/qwen3-0.6b-base-scope", "mixed-l18-x16-a20-b0")
