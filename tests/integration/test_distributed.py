"""DDP on CPU (gloo): two ranks read different data and end with identical weights."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.support.configs import TINY, cli, cli_env


@pytest.mark.slow
def test_ddp_two_cpu_ranks(tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    cmd = cli(
        "bilae.train", *TINY, "steps=6", "trainer.val_check_interval=6",
        "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
        "+callbacks.probe._target_=tests.support.probe.DataProbe", f"+callbacks.probe.directory={probe}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    sums = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(sums[0]) == len(sums[1]) == 6
    assert not set(sums[0]) & set(sums[1]), "both ranks saw the same batches"
    weights = [load_file(str(probe / f"rank{r}.safetensors")) for r in (0, 1)]
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name
    assert (tmp_path / "run" / "metrics.json").is_file()
