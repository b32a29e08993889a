"""``--help`` of every command: what it does, the config groups that apply with their options, five examples that
compose for real, and where the outputs go (conf/hydra/help/*.yaml; bilae-sweep's argparse text)."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from bilae.config import CONF_DIR, compose
from tests.support.configs import cli, cli_env

GROUPS = {
    "train": ["model", "data", "autoencoder", "optimizer", "trainer", "logger", "callbacks", "analysis", "debug",
              "experiment"],
    "analyze": ["model", "data", "logger", "analysis", "paths"],
    "cache": ["model", "data", "paths"],
}  # fmt: skip


def help_text(module: str, cwd: Path) -> str:
    done = subprocess.run(
        cli(module, "--help"), cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def examples(text: str, command: str) -> list[list[str]]:
    """The argument lists of the example lines (a trailing ``# comment`` dropped)."""
    section = text.split("Examples:", 1)[1].split("\n\n", 1)[0]
    lines = [line.split("  #", 1)[0].strip() for line in section.splitlines() if line.strip()]
    assert all(line.startswith(command + " ") or line == command for line in lines), lines
    return [shlex.split(line)[1:] for line in lines]


def first_of_sweep(args: list[str]) -> list[str]:
    """A ``-m`` example's overrides with each swept list reduced to its first value (what job 0 composes)."""
    return [a.split(",", 1)[0] if "=" in a and "[" not in a else a for a in args if a != "-m"]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["train", "analyze", "cache"])
def test_help_says_what_the_command_does_and_shows_real_examples(command: str, tmp_path: Path) -> None:
    text = help_text(f"bilae.{command}", tmp_path)
    assert (
        text.startswith(f"bilae-{command}: ")
        and "powered by Hydra" not in text
        and "== Config ==" not in text
    )
    groups = text.split("Config groups", 1)[1].split("\n\n", 1)[0]
    assert re.findall(r"^  (\w+) ", groups, re.M) == GROUPS[command]  # those that apply, and only those
    for group in GROUPS[command]:
        for option in sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")):
            assert option in text, f"{group}={option} missing from bilae-{command} --help"
    assert "minilm*" in text  # the option in use is marked
    assert "Outputs" in text and "outputs/<date>/<time>" in text
    found = examples(text, f"bilae-{command}")
    assert len(found) == 5
    for args in found:  # every example composes (groups, options and keys exist)
        compose(command, first_of_sweep(args))
    assert not list(tmp_path.iterdir()), "--help wrote files"


@pytest.mark.slow
def test_bilae_sweep_help(tmp_path: Path) -> None:
    text = help_text("bilae.sweep", tmp_path)
    assert text.startswith("usage: bilae-sweep") and "Pareto plot" in text
    assert (
        text.count("\n  bilae-sweep ") == 5
        and "sweep.html" in text
        and "outputs (in the sweep directory" in text
    )
