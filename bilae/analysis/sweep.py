"""Reading the ``metrics.json`` files of a multirun sweep, for the Pareto plot.

Each file is a JSON object of a run's final metrics; nested objects are flattened with ``/`` (so
``{"val": {"mse": 0.1}}`` reads as ``val/mse``). A run's kind is read from ``kind`` or any key ending in ``/kind``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bilae.errors import DataError, UsageError


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a/b": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}/"))
        else:
            flat[name] = value
    return flat


def load_sweep(directory: str | Path, filename: str = "metrics.json") -> list[dict[str, Any]]:
    """Every ``filename`` under ``directory`` (recursively), flattened, with its ``path`` added.

    Runs that crashed before writing metrics are skipped; unreadable files are too, with their paths kept
    in the error raised when nothing could be read.

    Raises:
        UsageError: ``directory`` does not exist.
        DataError: no readable ``filename`` was found.
    """
    root = Path(directory)
    if not root.is_dir():
        raise UsageError(f"sweep directory {str(root)!r} does not exist")
    runs, broken = [], []
    for path in sorted(root.rglob(filename)):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            broken.append(str(path))
            continue
        if isinstance(data, dict):
            runs.append({**flatten(data), "path": str(path)})
    if not runs:
        extra = f" ({len(broken)} unreadable: {', '.join(broken[:3])})" if broken else ""
        raise DataError(f"no readable {filename} under {str(root)!r}{extra}; did the sweep finish any run?")
    return runs


def lookup(run: dict[str, Any], key: str) -> Any:
    """``run[key]``, else the value of ``val/key``, ``test/key`` or any key ending in ``/key``; None if absent."""
    for name in (key, f"val/{key}", f"test/{key}"):
        if name in run:
            return run[name]
    return next((v for name, v in run.items() if name.endswith(f"/{key}")), None)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points not dominated in (x, y) when both are minimised, sorted by x."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points):
        if not front or y < front[-1][1]:
            front.append((x, y))
    return front
