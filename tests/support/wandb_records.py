"""Read the history of an offline W&B run from its ``run-*.wandb`` file (a LevelDB-style record log).

wandb 0.31 has no public Python reader for offline runs, and the tests must check what was really logged.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
HEADER = 7  # checksum (4), length (2), type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[pb.Record]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B log"
    out, pos, pending = [], 7, b""
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            break
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def history(run_dir: Path) -> list[dict[str, str]]:
    """Each logged step as {key: JSON value}."""
    (log,) = run_dir.glob("run-*.wandb")
    steps = []
    for record in records(log):
        if record.WhichOneof("record_type") == "history":
            steps.append(
                {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
            )
    return steps


def run_record(run_dir: Path) -> pb.RunRecord:
    """The run's own record: id, display name, group and the config it started with."""
    (log,) = run_dir.glob("run-*.wandb")
    return next(r.run for r in records(log) if r.WhichOneof("record_type") == "run")


def config(run_dir: Path) -> dict[str, object]:
    """The run's config as logged: every key → its JSON-decoded value (nested dicts stay nested)."""
    (log,) = run_dir.glob("run-*.wandb")
    found: dict[str, object] = {}
    for record in records(log):
        kind = record.WhichOneof("record_type")
        updates = (
            record.run.config.update if kind == "run" else record.config.update if kind == "config" else []
        )
        for item in updates:
            found[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return found


def summary(run_dir: Path) -> dict[str, object]:
    """The run's final summary: every key → its last JSON-decoded value."""
    (log,) = run_dir.glob("run-*.wandb")
    found: dict[str, object] = {}
    for record in records(log):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                found[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return found
