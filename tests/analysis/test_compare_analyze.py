"""``bilae-analyze … compare=<other checkpoint>``: the comparison reaches the report; bad folders are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from bilae import Autoencoder
from bilae import analyze as A
from bilae.errors import CheckpointError, UsageError
from tests.support.configs import analyze_cfg


@pytest.fixture(scope="module")
def coders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Untrained tiny autoencoders for Qwen3-tiny (d=64) at layer 1, and one of another width."""
    root = tmp_path_factory.mktemp("coders")
    Autoencoder.from_config("mixed", d_model=64, layer=1, expansion=2, bottleneck=1).save(root / "a")
    Autoencoder.from_config("vanilla", d_model=64, layer=1, expansion=2).save(root / "b")
    Autoencoder.from_config("vanilla", d_model=32, layer=1, expansion=2).save(root / "narrow")
    return root


@pytest.mark.slow
def test_analyze_compares_two_checkpoints(coders: Path, tmp_path: Path) -> None:
    cfg = analyze_cfg(
        tmp_path, f"checkpoint={coders / 'a'}", f"compare={coders / 'b'}", "analysis.run=[compare,spectrum]",
        "analysis.options.compare.rank=8", "analysis.n_features=2",
    )  # fmt: skip
    text = A.run(cfg).read_text(encoding="utf-8")
    assert "Comparison with another autoencoder" in text and "vanilla-l01-x2-a0-b0" in text
    assert "mean principal cosine" in text and "over 8 directions" in text


def test_compare_refuses_a_missing_folder_and_another_width(coders: Path, tmp_path: Path) -> None:
    cfg = analyze_cfg(tmp_path, f"checkpoint={coders / 'a'}", f"compare={tmp_path / 'nowhere'}")
    with pytest.raises(UsageError, match=r"compare=.*nowhere is not a folder; give an autoencoder folder"):
        A.run(cfg)
    cfg = analyze_cfg(tmp_path, f"checkpoint={coders / 'a'}", f"compare={coders / 'narrow'}")
    with pytest.raises(
        CheckpointError, match="has d_model 32, but checkpoint mixed-l01-x2-a0-b0 has d_model 64"
    ):
        A.run(cfg)
