"""The bad-input table: every class of mistake, through the real console-script code path (Hydra, bilae's error
reporting, ``sys.exit``) of bilae-train, bilae-analyze and bilae-cache, in one subprocess.

Each case must end with exactly one line ``bilae-<prog>: error: …`` naming the bad value, exit code 2 (usage) or 1
(runtime), no traceback, and every file that was there before byte-identical (sha256), with nothing new beside it
but Hydra's own record of a fresh run directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bilae import Autoencoder
from tests.support.configs import TINY, TINY_ANALYZE, TINY_DATA, TINY_FOR_CACHE, cli, cli_env
from tests.support.crafted import split_cases

CHECK_DIR = "++hydra.callbacks.check_output_dir._target_=bilae.cli.CheckOutputDir"
HYDRA_OWN = {".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "train.log", "analyze.log",
             "cache.log"}  # fmt: skip


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` → sha256 (symlinks by their target name)."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            out[str(path.relative_to(root))] = "-> " + os.readlink(path)
        elif path.is_file():
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def export(folder: Path, edit: dict | None = None) -> Path:
    """A tiny exported mixed autoencoder for Qwen3-tiny at layer 2, its config.json then edited with ``edit``."""
    Autoencoder.from_config("mixed", d_model=64, layer=2, expansion=2, bottleneck=1).save(folder)
    if edit:
        data = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**data, **edit}))
    return folder


def reweight(folder: Path, change) -> Path:
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    save_file({k: change(v) for k, v in state.items()}, str(folder / "model.safetensors"))
    return folder


def inputs(d: Path) -> None:
    """The bad files the table points at (all under ``d / 'inputs'``)."""
    i = d / "inputs"
    i.mkdir()
    (i / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (i / "latin1.txt").write_bytes("café naïve résumé".encode("latin-1"))
    (i / "bad.jsonl").write_text('{"text": "fine"}\n{not json}\n')
    (i / "number.jsonl").write_text('{"text": 42}\n')
    (i / "adir.txt").mkdir()
    (i / "dangling.txt").symlink_to(i / "nowhere.txt")
    (i / "corrupt.parquet").write_bytes(b"PAR1" + b"\x00garbage" * 50)
    export(i / "good")
    export(i / "tags-type", {"tags": 5})
    export(i / "extra-type", {"extra": "not a dict"})
    export(i / "bottleneck-type", {"bottleneck": "two"})
    export(i / "kind-type", {"kind": 3})
    reweight(export(i / "int-weights"), lambda t: t.to(torch.int32))
    reweight(export(i / "nan-weights"), lambda t: torch.full_like(t, float("nan")))
    export(i / "traversal", {"tags": ["../../../../escaped"]})
    (i / "a-file").write_text("not a directory\n")
    (i / "report-dir").mkdir()
    cache = i / "cache-nosplits"
    cache.mkdir()
    (cache / "meta.json").write_text(json.dumps({"format": "bilae-activation-cache", "version": 1}))
    cache = i / "cache-dtype"
    cache.mkdir()
    meta = {"format": "bilae-activation-cache", "version": 1, "model": "qwen3-tiny", "layer": 2, "d_model": 64,
            "dtype": "int8", "splits": {"train": {"n_tokens": 10, "shards": []}}}  # fmt: skip
    (cache / "meta.json").write_text(json.dumps(meta))
    user = i / "user-dir"
    (user / "train").mkdir(parents=True)
    (user / "train" / "00000.safetensors").write_bytes(b"the user's own file")


def table(d: Path) -> list[tuple[str, str, list[str], int, list[str]]]:
    """(name, prog, overrides, exit code, words the error line must contain)."""
    i = d / "inputs"
    files = ["data=files"]
    return [
        # -- numeric settings: non-numeric, nan, inf, negative, impossible
        ("steps-text", "train", ["steps=abc"], 2, ["steps", "'abc'", "integer"]),
        ("steps-negative", "train", ["steps=-1"], 2, ["steps", "-1", ">= 1"]),
        ("seed-negative", "train", ["seed=-3"], 2, ["seed", "-3"]),
        ("grad-clip-nan", "train", ["grad_clip=nan"], 2, ["grad_clip", "nan"]),
        ("warmup-fraction", "train", ["alpha_warmup=1.5"], 2, ["alpha_warmup", "1.5"]),
        ("lr-inf", "train", ["optimizer.lr=inf"], 2, ["optimizer.lr", "inf"]),
        ("lr-zero", "train", ["optimizer.lr=0"], 2, ["optimizer.lr", "> 0"]),
        ("n-ctx-negative", "train", ["data.n_ctx=-3"], 2, ["data.n_ctx", "-3"]),
        ("max-sequences-zero", "train", ["data.max_sequences=0"], 2, ["data.max_sequences", "0"]),
        ("val-sequences-fraction", "train", ["data.val_sequences=1.5"], 2, ["data.val_sequences", "1.5"]),
        ("feature-negative", "analyze", [f"checkpoint={i}/good", "feature=-1"], 2, ["feature", "-1"]),
        ("n-features-negative", "analyze", ["checkpoint=x", "analysis.n_features=-1"], 2, ["n_features", "-1"]),
        ("cache-tokens-negative", "cache", [f"cache.dir={d}/new-cache", "cache.tokens=-5"], 2, ["cache.tokens", "-5"]),
        ("cache-batches-text", "cache", [f"cache.dir={d}/new-cache", "cache.batches=many"], 2, ["cache.batches", "many"]),
        # -- malformed exported folders
        ("tags-type", "train", [f"init_from={i}/tags-type"], 2, ["tags", "5"]),
        ("extra-type", "train", [f"init_from={i}/extra-type"], 2, ["extra", "not a dict"]),
        ("bottleneck-type", "train", [f"init_from={i}/bottleneck-type"], 2, ["bottleneck", "two"]),
        ("kind-type", "analyze", [f"checkpoint={i}/kind-type"], 2, ["kind", "3"]),
        ("int-weights", "train", [f"init_from={i}/int-weights"], 2, ["int32", "tensor"]),
        ("nan-weights", "analyze", [f"checkpoint={i}/nan-weights"], 2, ["non-finite", "NaN"]),
        ("nan-init-from", "train", [f"init_from={i}/nan-weights"], 2, ["non-finite", "nan-weights"]),
        ("traversal-tag", "train", [f"init_from={i}/traversal"], 2, ["../../../../escaped"]),
        # -- bad text files for data=files
        ("binary-text", "train", [*files, f"data.source_kwargs.paths={i}/binary.txt"], 2, ["binary.txt", "UTF-8"]),
        ("latin1-text", "train", [*files, f"data.source_kwargs.paths={i}/latin1.txt"], 2, ["latin1.txt", "UTF-8"]),
        ("bad-json", "train", [*files, f"data.source_kwargs.paths={i}/bad.jsonl"], 2, ["bad.jsonl:2", "JSON"]),
        ("number-text", "train", [*files, f"data.source_kwargs.paths={i}/number.jsonl"], 2, ["number.jsonl:1", "42"]),
        ("directory-as-file", "train", [*files, f"data.source_kwargs.paths={i}/adir.txt"], 2, ["adir.txt", "directory"]),
        ("dangling-link", "train", [*files, f"data.source_kwargs.paths={i}/dangling.txt"], 2, ["dangling.txt"]),
        ("corrupt-parquet", "train", [*files, f"data.source_kwargs.paths={i}/corrupt.parquet"], 2, ["corrupt.parquet"]),
        ("no-paths", "train", [*files, "data.source_kwargs.paths=[]"], 2, ["paths"]),
        # -- malformed caches and cache directories
        ("cache-no-splits", "train", ["data=cache", f"data.dir={i}/cache-nosplits"], 2, ["meta.json", "splits"]),
        ("cache-dtype", "train", ["data=cache", f"data.dir={i}/cache-dtype"], 2, ["int8", "float16"]),
        ("cache-no-dir", "train", ["data=cache"], 2, ["data.dir"]),
        ("cache-without-dir", "cache", [], 2, ["cache.dir"]),
        ("cache-dir-file", "cache", [f"cache.dir={i}/a-file"], 2, ["a-file", "is a file"]),
        ("cache-user-dir", "cache", [f"cache.dir={i}/user-dir"], 2, ["user-dir", "not an activation cache"]),
        # -- devices that are not there
        ("trainer-gpu", "train", ["trainer=gpu"], 2, ["trainer.accelerator=gpu", "trainer=cpu"]),
        ("cache-cuda", "cache", [f"cache.dir={d}/new-cache", "cache.device=cuda"], 2, ["cache.device=cuda"]),
        ("analyze-device", "analyze", ["checkpoint=x", "device=foo"], 2, ["device", "foo"]),
        # -- output paths that cannot be files
        ("report-is-dir", "analyze", [f"checkpoint={i}/good", f"report={i}/report-dir"], 2, ["report-dir"]),
        ("report-under-file", "analyze", [f"checkpoint={i}/good", f"report={i}/a-file/r.html"], 2, ["a-file"]),
        ("output-under-file", "train", [f"paths.output_dir={i}/a-file/out"], 2, ["a-file/out", "not writable"]),
    ]  # fmt: skip


BASE = {
    "train": [*TINY, "steps=2", CHECK_DIR],
    "analyze": [*TINY_ANALYZE, "logger=none", CHECK_DIR],
    "cache": [*TINY_DATA, "data.max_sequences=40", CHECK_DIR],
    "train-cache": [*TINY_FOR_CACHE, "steps=2", CHECK_DIR],
}


@pytest.mark.slow
def test_bad_inputs_give_one_line_name_the_value_and_change_nothing(tmp_path: Path) -> None:
    d = tmp_path
    inputs(d)
    rows = table(d)
    before = tree(d / "inputs")
    cases = []
    for name, prog, overrides, _, _ in rows:
        base = BASE["train-cache"] if "data=cache" in overrides else BASE[prog]
        cases.append(
            {"name": name, "prog": prog, "argv": [*base, f"hydra.run.dir={d}/runs/{name}", *overrides]}
        )
    spec = d / "cases.json"
    spec.write_text(json.dumps(cases))
    done = subprocess.run(cli("tests.support.crafted", str(spec)), cwd=d, env=cli_env(), capture_output=True,
                          text=True, timeout=1500)  # fmt: skip
    results = split_cases(done.stderr)
    failures = []
    for name, prog, _, code, words in rows:
        got, stderr = results.get(name, (None, f"no result; driver stderr tail: {done.stderr[-2000:]}"))
        lines = [line for line in stderr.splitlines() if "error:" in line]
        problems = []
        if got != code:
            problems.append(f"exit {got}, expected {code}")
        if "Traceback" in stderr:
            problems.append("a traceback")
        if len(lines) != 1 or not lines[0].startswith(f"bilae-{prog}: error: "):
            problems.append(f"not one error line: {lines}")
        problems += [f"{w!r} not named" for w in words if not any(w in line for line in lines)]
        if problems:
            failures.append(f"{name}: {'; '.join(problems)}\n    {stderr.strip()[-600:]}")
    assert not failures, f"{len(failures)} of {len(rows)} cases failed:\n" + "\n".join(failures)
    assert tree(d / "inputs") == before, "a failed command changed an input file"
    for name, *_ in rows:  # nothing but Hydra's own record in each fresh run directory
        left = set(tree(d / "runs" / name)) if (d / "runs" / name).exists() else set()
        assert left <= HYDRA_OWN, f"{name} left {left - HYDRA_OWN}"
    assert not (d / "escaped").exists() and not list(d.parent.glob("escaped*")), (
        "a path left the run directory"
    )
    assert not (d / "new-cache").exists(), "a refused bilae-cache wrote its directory"
