"""The wheel ships the configs: built from a copy of the project, installed non-editable into a fresh venv, its
commands work from an unrelated directory.

The fresh venv reaches the already installed dependencies through a ``.pth`` line naming this environment's
site-packages (a plain path: the editable bilae installed there is not activated), so nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.support.configs import ROOT


def run(*cmd: str | Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


def build_wheel(tmp_path: Path) -> Path:
    """``pip wheel`` of a copy of the project (building in place would leave build/ in the checkout)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for name in ("bilae", "conf"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        ".",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        tmp_path / "dist",
        cwd=source,
    )
    (wheel,) = (tmp_path / "dist").glob("bilae-*.whl")
    return wheel


def fresh_venv(tmp_path: Path) -> Path:
    """A venv without bilae that sees this environment's packages (torch, lightning, hydra...)."""
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    (site,) = (venv / "lib").glob("python*/site-packages")
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


@pytest.mark.slow
def test_the_installed_wheel_finds_its_configs_from_anywhere(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert {
        "bilae/conf/train.yaml",
        "bilae/conf/hydra/help/train.yaml",
        "bilae/conf/model/minilm.yaml",
    } <= set(names)
    assert {f"bilae/conf/{p.relative_to(ROOT / 'conf')}" for p in (ROOT / "conf").rglob("*.yaml")} <= set(
        names
    )

    venv = fresh_venv(tmp_path)
    run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        venv / "bin" / "python",
        "install",
        "--no-deps",
        "-q",
        wheel,
        cwd=tmp_path,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env |= {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    where = run(
        venv / "bin" / "python", "-c", "import bilae.config as c; print(c.CONF_DIR)", cwd=elsewhere, env=env
    )
    assert Path(where.stdout.strip()).is_relative_to(venv), "the installed package, not this checkout"

    job = run(venv / "bin" / "bilae-train", "--cfg", "job", cwd=elsewhere, env=env)
    assert "name: minilm" in job.stdout and "steps: 150" in job.stdout
    helped = run(venv / "bin" / "bilae-analyze", "--help", cwd=elsewhere, env=env)
    assert helped.stdout.startswith("bilae-analyze: ") and "Examples:" in helped.stdout
    assert (venv / "bin" / "bilae-sweep").is_file() and (venv / "bin" / "bilae-cache").is_file()
    assert not list(elsewhere.iterdir())
