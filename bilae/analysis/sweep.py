"""Reading a multirun sweep: each job's final metrics and overrides, as a table and as points of a Pareto plot.

Each ``metrics.json`` is a JSON object of a run's final metrics; nested objects are flattened with ``/`` (so
``{"val": {"mse": 0.1}}`` reads as ``val/mse``). A run's kind is read from ``kind`` or any key ending in ``/kind``.
A job's overrides come from Hydra's ``.hydra/overrides.yaml`` beside its ``metrics.json``; the keys whose values
differ between jobs are the swept ones, and they label the job in the table and in the plot. A job that trained
several autoencoders together (list-valued options) is one row per autoencoder. Pure: reads files, writes nothing.
"""

from __future__ import annotations

import csv
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

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
            runs.append({**flatten(data), "path": str(path), "overrides": read_overrides(path.parent)})
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


#: The metric columns of the sweep table, in order (those no job has are left out).
METRICS = ("val/mse", "val/density", "train/mse", "train/density", "train/loss", "steps")


def read_overrides(run_dir: Path) -> list[str]:
    """The Hydra overrides a job ran with (``.hydra/overrides.yaml``); empty when there is none."""
    try:
        data = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return []
    return [str(o) for o in data] if isinstance(data, list) else []


def override_key(override: str) -> str:
    """The key an override sets: ``+a.b=1`` → ``a.b``, ``~c`` → ``c``."""
    return override.lstrip("+~").split("=", 1)[0]


def per_coder(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per autoencoder: a job with ``coders/<name>/...`` metrics becomes one row per name (``coder``)."""
    rows = []
    for run in runs:
        names = sorted({k.split("/")[1] for k in run if k.startswith("coders/") and k.count("/") >= 2})
        if not names:
            rows.append(dict(run))
            continue
        common = {k: v for k, v in run.items() if not k.startswith("coders/") and k != "val/mse"}
        for name in names:
            prefix = f"coders/{name}/"
            rows.append(
                {
                    **common,
                    "coder": name,
                    **{k[len(prefix) :]: v for k, v in run.items() if k.startswith(prefix)},
                }
            )
    return rows


def swept(rows: Sequence[dict[str, Any]]) -> list[list[str]]:
    """Per row, the overrides whose key has different values across rows (the swept ones), in command-line order."""
    given = [{override_key(o): o for o in row.get("overrides", [])} for row in rows]
    keys = {key for g in given for key in g}
    varied = {key for key in keys if len({g.get(key) for g in given}) > 1}
    return [[o for o in row.get("overrides", []) if override_key(o) in varied] for row in rows]


def labels(rows: Sequence[dict[str, Any]]) -> list[str]:
    """A short label per row: its swept values (``alpha=0.1``, the last part of each key) and its coder if any."""
    out = []
    for row, overrides in zip(rows, swept(rows)):
        parts = [_short(o) for o in overrides] + ([str(row["coder"])] if "coder" in row else [])
        out.append(" ".join(parts) or _job(row))
    return out


def sweep_table(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """``(columns, values)``: job, its label (swept values), each metric some row has, and its overrides (a list)."""
    metrics = [m for m in METRICS if any(m in r for r in rows)]
    columns = ["job", "swept", *metrics, "overrides"]
    values = [
        [_job(r), label, *(r.get(m) for m in metrics), list(r.get("overrides", []))]
        for r, label in zip(rows, labels(rows))
    ]
    return columns, values


def to_csv(columns: Sequence[str], values: Sequence[Sequence[Any]]) -> str:
    """The table as CSV text (the overrides space-separated)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([_cell(v) for v in row] for row in values)
    return buffer.getvalue()


def to_markdown(columns: Sequence[str], values: Sequence[Sequence[Any]]) -> str:
    """The table as Markdown; the overrides every row shares are said once below it instead of in each row."""
    shared = [o for o in values[0][-1] if all(o in row[-1] for row in values)] if values else []
    lines = ["| " + " | ".join([*columns[:-1], "other overrides"]) + " |", "|" + "---|" * len(columns)]
    for row in values:
        own = [o for o in row[-1] if o not in shared]
        lines.append("| " + " | ".join(_cell(v).replace("|", "\\|") for v in [*row[:-1], own]) + " |")
    if shared:
        lines.append(f"\nEvery job: `{' '.join(shared)}`")
    return "\n".join(lines) + "\n"


def to_html_table(columns: Sequence[str], values: Sequence[Sequence[Any]]) -> str:
    """The table as an HTML fragment (escaped)."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>" for row in values
    )
    return f'<table class="sweep"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _short(override: str) -> str:
    key, _, value = override.lstrip("+~").partition("=")
    return f"{key.rsplit('.', 1)[-1]}={value}"


def _job(row: dict[str, Any]) -> str:
    path = Path(str(row.get("path", "")))
    return path.parent.name or "?"


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(map(str, value))
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def sweep_page(title: str, figure: Any, columns: Sequence[str], values: Sequence[Sequence[Any]]) -> str:
    """A self-contained HTML page (plotly.js inlined, no network): the Pareto figure, then the table."""
    import plotly.io as pio

    plot = pio.to_html(figure, include_plotlyjs=True, full_html=False, default_height=560)
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
        "body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1200px;color:#222}"
        "table.sweep{border-collapse:collapse;font-size:.9em}"
        "table.sweep td,table.sweep th{border:1px solid #ddd;padding:3px 8px;text-align:left}"
        f"</style></head><body><h1>{html.escape(title)}</h1>{plot}{to_html_table(columns, values)}</body></html>\n"
    )
