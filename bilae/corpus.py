"""Text in, token windows out: the registered text sources and their tokenisation into ``n_ctx`` windows.

Registered text sources (``text_source(name, **kwargs)``):
- ``pydoc``: the standard library's ``pydoc_data.topics`` (~465k characters, ~128k MiniLM tokens), offline.
- ``files``: local ``.txt``/``.md`` (one document per file), ``.jsonl`` and ``.parquet`` (one per row) by glob.
- ``hf``: any Hugging Face dataset through ``datasets.load_dataset`` (streamed by default).
- ``fineweb-edu``: ``HuggingFaceFW/fineweb-edu``, config ``sample-10BT``, streamed (the paper's corpus).
"""

from __future__ import annotations

import glob
import json
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from itertools import islice
from pathlib import Path

import torch
from torch import Tensor

from bilae.errors import DataError, UsageError, unknown


# ---------------------------------------------------------------------------------------------------- sources
def pydoc_texts() -> Iterator[str]:
    """Documents of Python's built-in help topics, in a fixed (sorted) order."""
    from pydoc_data.topics import topics

    return (topics[key] for key in sorted(topics))


def file_texts(paths: str | list[str], text_column: str = "text") -> Iterator[str]:
    """Documents from local files matching glob pattern(s): whole ``.txt``/``.md`` files, ``.jsonl``/``.parquet`` rows."""
    patterns = [paths] if isinstance(paths, str) else list(paths)
    files = sorted({f for p in patterns for f in glob.glob(str(Path(p).expanduser()), recursive=True)})
    if not files:
        raise DataError(
            f"data.source_kwargs.paths {patterns} matches no files; give paths or globs such as 'corpus/*.txt'"
        )
    for file in files:
        yield from _read_file(Path(file), text_column)


def _read_file(file: Path, text_column: str) -> Iterator[str]:
    """The documents of one file; any way it cannot be read is one DataError naming it."""
    if file.is_dir():
        raise DataError(f"{file} is a directory, not a text file; point data.source_kwargs.paths at files")
    if not file.exists():
        raise DataError(f"{file} does not exist (a dangling symbolic link?)")
    try:
        yield from _documents(file, text_column)
    except UnicodeDecodeError as err:
        raise DataError(
            f"{file} is not UTF-8 text (byte {err.object[err.start]:#04x} at position {err.start}); "
            "convert it to UTF-8"
        ) from None
    except OSError as err:
        raise DataError(f"cannot read {file}: {err.strerror or err}") from None


def _documents(file: Path, text_column: str) -> Iterator[str]:
    if file.suffix in (".txt", ".md"):
        yield file.read_text(encoding="utf-8")
    elif file.suffix == ".jsonl":
        with file.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if line.strip():
                    yield _column(_json_row(line, f"{file}:{number}"), text_column, f"{file}:{number}")
    elif file.suffix == ".parquet":
        yield from _parquet_texts(file, text_column)
    else:
        raise UsageError(
            f"cannot read {file}: unknown extension {file.suffix!r}; valid: .txt, .md, .jsonl, .parquet"
        )


def _json_row(line: str, where: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where} is not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(row, dict):
        raise DataError(f"{where} is a JSON {type(row).__name__}, not an object with a text field")
    return row


def _parquet_texts(file: Path, text_column: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq  # a dependency of datasets

    try:
        table = pq.read_table(file)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{file} is not a readable parquet file ({str(err).splitlines()[0]})") from None
    if text_column not in table.column_names:
        raise DataError(f"{file} has no column {text_column!r}; columns: {table.column_names}")
    for number, text in enumerate(table.column(text_column).to_pylist()):
        yield _text(text, f"{file} row {number}", text_column)


def _column(row: dict, text_column: str, where: str) -> str:
    if text_column not in row:
        raise DataError(f"{where} has no field {text_column!r}; fields: {sorted(row)}")
    return _text(row[text_column], where, text_column)


def _text(value: object, where: str, text_column: str) -> str:
    if not isinstance(value, str):
        raise DataError(
            f"{where}: field {text_column!r} holds {value!r} ({type(value).__name__}), not a string"
        )
    return value


def hf_texts(
    path: str,
    name: str | None = None,
    split: str = "train",
    *,
    streaming: bool = True,
    text_column: str = "text",
    revision: str | None = None,
    **kwargs,
) -> Iterator[str]:
    """Documents of a Hugging Face dataset (``datasets.load_dataset``), streamed by default."""
    import datasets

    try:
        dataset = datasets.load_dataset(
            path, name, split=split, streaming=streaming, revision=revision, **kwargs
        )
    except (OSError, ConnectionError, ValueError) as err:
        raise DataError(
            f"could not load dataset {path!r} (config {name!r}, split {split!r}): {err}"
        ) from None
    return (_column(row, text_column, f"dataset {path!r}") for row in dataset)


SOURCES: dict[str, Callable[..., Iterator[str]]] = {
    "pydoc": pydoc_texts,
    "files": file_texts,
    "hf": hf_texts,
    "fineweb-edu": partial(hf_texts, "HuggingFaceFW/fineweb-edu", "sample-10BT"),
}
STREAMED = {"hf", "fineweb-edu"}


def text_source(name: str, **kwargs) -> Iterator[str]:
    """Documents of the registered source ``name`` (see the module docstring); kwargs go to the source."""
    if name not in SOURCES:
        raise unknown("text source", name, SOURCES)
    return SOURCES[name](**kwargs)


# ---------------------------------------------------------------------------------------------- tokenisation
def special_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text (BERT: [CLS] and [SEP]; Qwen3: none)."""
    probe = "hello world"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    raise UsageError(
        f"cannot tell where {type(tokenizer).__name__} puts its special tokens: {full} vs {plain}"
    )


def token_windows(
    texts: Iterable[str], tokenizer, n_ctx: int, docs_per_call: int = 64
) -> Iterator[list[int]]:
    """Chunk every document into consecutive windows of at most ``n_ctx`` tokens, special tokens included.

    Long documents become several windows instead of being truncated, so small corpora are not wasted; each
    window gets the model's own special tokens (e.g. BERT's [CLS] ... [SEP]).
    """
    prefix, suffix = special_affixes(tokenizer)
    body = n_ctx - len(prefix) - len(suffix)
    if body <= 0:
        raise UsageError(
            f"n_ctx must exceed the tokenizer's {len(prefix) + len(suffix)} special tokens per window; got {n_ctx}"
        )
    texts = iter(texts)
    while chunk := list(islice(texts, docs_per_call)):
        # verbose=False: documents longer than the model's max length are fine here, they are chunked below.
        for ids in tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]:
            for start in range(0, len(ids), body):
                yield prefix + ids[start : start + body] + suffix


def pad_windows(windows: list[list[int]], n_ctx: int, pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad windows into ``(input_ids, attention_mask)``, both (N, n_ctx) long."""
    ids = torch.full((len(windows), n_ctx), pad_id, dtype=torch.long)
    mask = torch.zeros((len(windows), n_ctx), dtype=torch.long)
    for row, window in enumerate(windows):
        ids[row, : len(window)] = torch.tensor(window, dtype=torch.long)
        mask[row, : len(window)] = 1
    return ids, mask


def tokenize_corpus(
    texts: Iterable[str], tokenizer, n_ctx: int, max_sequences: int | None = None, source: str = "corpus"
) -> tuple[Tensor, Tensor]:
    """Tokenise a whole (finite) corpus into padded windows; raises DataError naming ``source`` if it is empty."""
    windows = list(islice(token_windows(texts, tokenizer, n_ctx), max_sequences))
    if not windows:
        raise DataError(
            f"the corpus is empty: text source {source} yielded no tokens; point it at files with text"
        )
    return pad_windows(windows, n_ctx, tokenizer.pad_token_id)
