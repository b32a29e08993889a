"""Crafted bad inputs for the reliability tests, and an in-process CLI driver.

``python -m tests.support.crafted CASES.json`` runs ``bilae.<prog>.main()`` once per case (``{"name", "argv"[, "prog"]}``)
in one process, so a table of bad inputs pays for the imports once. Each case is the real console-script path (Hydra,
bilae's error reporting, ``sys.exit``); the driver catches the ``SystemExit`` (except the last case's, which ends the
process for real) and brackets each case's output::

    @@case <name>            (on stdout and stderr)
    @@exit <name> <code>     (on stdout and stderr)
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path
from typing import Any

import torch


class Evil:
    """Unpickling this runs a shell command: what a malicious checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def evil_checkpoint(path: Path, marker: Path) -> Path:
    """A .ckpt that looks like Lightning's but runs ``touch marker`` when unpickled without weights_only."""
    torch.save({"state_dict": {}, "global_step": 0, "epoch": 0, "payload": Evil(marker)}, path)
    return path


def garbage_file(path: Path, size: int = 4096, seed: int = 0) -> Path:
    """``size`` seeded random bytes (the same file every run)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


# ------------------------------------------------------------------------------------------------ driver
def run_cases(cases: list[dict[str, Any]]) -> None:
    """Run each case's command line (``prog``: train, analyze or cache; train by default) in turn; the last one's
    exit ends the process for real."""
    import importlib

    from hydra.core.global_hydra import GlobalHydra

    for i, case in enumerate(cases):
        name, prog = case["name"], case.get("prog", "train")
        for stream in (sys.stdout, sys.stderr):
            print(f"@@case {name}", file=stream, flush=True)
        sys.argv = [f"bilae-{prog}", *case["argv"]]
        code: object = 0
        try:
            importlib.import_module(f"bilae.{prog}").main()
        except SystemExit as done:
            code = done.code
            if i == len(cases) - 1:
                _report_exit(name, code)
                raise
        GlobalHydra.instance().clear()
        _report_exit(name, code)


def _report_exit(name: str, code: object) -> None:
    code = 0 if code is None else code if isinstance(code, int) else 1
    for stream in (sys.stdout, sys.stderr):
        print(f"@@exit {name} {code}", file=stream, flush=True)


def split_cases(text: str) -> dict[str, tuple[int, str]]:
    """``{name: (exit code, output)}`` from a driver's stdout or stderr."""
    results: dict[str, tuple[int, str]] = {}
    name, lines = None, []
    for line in text.splitlines():
        if line.startswith("@@case "):
            name, lines = line.split(" ", 1)[1], []
        elif line.startswith("@@exit ") and name is not None:
            results[name] = (int(line.rsplit(" ", 1)[1]), "\n".join(lines))
            name = None
        elif name is not None:
            lines.append(line)
    return results


if __name__ == "__main__":
    run_cases(json.loads(Path(sys.argv[1]).read_text()))
