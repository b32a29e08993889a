"""The seed notebook's interactive API: ``Feature`` (max-activating contexts) and ``Manifold`` (3-D views).

Both take a ``harvest`` callable, ``harvest(input_ids, attention_mask) -> (acts (B, T, d), mask (B, T) bool)``
(e.g. ``bilae.hooks.Harvester``; ``Feature`` uses ``coder.hooked`` when none is given), and a tokenised dataset
(a Hugging Face ``Dataset``, a dict of columns or a list of rows) that is sliced into ``batch_size`` rows
(32 by default; ``batch_size=None`` takes ``data`` as an iterable of ready batches). The seed's calls work as
written::

    vis = Feature(coder, tokenizer, dataset, max_steps=2**4, batch_size=2**5)
    manifold = Manifold(dataset, coder.hooked, tokenizer, density, max_steps=2**5)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import islice
from typing import Any

import plotly.graph_objects as go
import torch
from torch import Tensor

from bilae.analysis import figures
from bilae.analysis.examples import Which, collect_examples, context_records, to_ansi, to_html
from bilae.analysis.forms import QuadraticForm, spectrum, symmetrize
from bilae.analysis.manifold import hover_texts, sample_manifold
from bilae.autoencoders import Autoencoder
from bilae.errors import UsageError

Harvest = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
Predict = Callable[[Tensor, Tensor], Tensor]


def token_batches(
    data: Any, batch_size: int | None = None, max_steps: int | None = None
) -> Iterator[dict[str, Tensor]]:
    """Dicts of ``input_ids``/``attention_mask`` tensors: ``data`` itself, or slices of it with ``batch_size``."""
    if batch_size is not None and batch_size <= 0:
        raise UsageError(f"batch_size must be positive, got {batch_size}")
    batches = data if batch_size is None or _is_batches(data) else _slices(data, batch_size)
    for batch in islice(batches, max_steps):
        if isinstance(batch, list) and batch and isinstance(batch[0], Mapping):
            batch = {key: [row[key] for row in batch] for key in batch[0]}  # a slice of a list of rows
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise UsageError(
                f"a token batch must be a dict with 'input_ids' (and 'attention_mask'), got {type(batch).__name__}"
            )
        ids = _column(batch["input_ids"])
        mask = (
            _column(batch["attention_mask"]) if "attention_mask" in batch else _column(batch["input_ids"], 1)
        )
        yield {"input_ids": ids, "attention_mask": mask}


def activation_batches(
    batches: Iterable[dict[str, Tensor]], harvest: Harvest, predict: Predict | None = None
) -> Iterator[tuple[Tensor, ...]]:
    """``(acts, mask, input_ids[, predicted next ids])`` per token batch."""
    for batch in batches:
        ids, attention = batch["input_ids"], batch["attention_mask"]
        with torch.no_grad():
            acts, mask = harvest(ids, attention)
            extra = (predict(ids, attention).to(acts.device),) if predict is not None else ()
        yield (acts, mask.bool(), ids.to(acts.device), *extra)


def _is_batches(data: Any) -> bool:
    """Whether ``data`` already holds batches: an iterable that cannot be sliced (a generator, a loader) or a
    list of dicts of 2-D ``input_ids``; otherwise it holds rows (or columns) to slice into batches."""
    if isinstance(data, Mapping):
        return False
    if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        return True
    if not isinstance(data, (list, tuple)) or not data or not isinstance(data[0], Mapping):
        return False
    ids = data[0].get("input_ids")
    return isinstance(ids, Tensor) and ids.ndim == 2


def _slices(data: Any, size: int) -> Iterator[Any]:
    if isinstance(data, Mapping):
        n = len(data["input_ids"])
        return ({key: column[i : i + size] for key, column in data.items()} for i in range(0, n, size))
    return (data[i : i + size] for i in range(0, len(data), size))


def _column(values: Any, fill: int | None = None) -> Tensor:
    """A (B, T) tensor of a batch's column; rows of unequal length (a ``Dataset`` padded per map batch) are
    right-padded with 0, which the attention mask (padded the same way) marks as padding. ``fill`` replaces
    the values (an all-ones mask of the same shape)."""
    if isinstance(values, (list, tuple)) and values and all(torch.as_tensor(v).ndim == 1 for v in values):
        rows = [torch.as_tensor(v) for v in values]
    else:
        column = torch.as_tensor(values)
        return column if fill is None else torch.full_like(column, fill)
    out = torch.zeros(len(rows), max(len(r) for r in rows), dtype=rows[0].dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row if fill is None else fill
    return out


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


class Feature:
    """Max/min-activating contexts of latents, collected once; ``vis(inds, k=3)`` (or calling it) shows them."""

    def __init__(
        self,
        coder: Autoencoder,
        tokenizer: Any,
        data: Any,
        harvest: Harvest | None = None,
        *,
        max_steps: int | None = None,
        batch_size: int | None = 32,
        indices: Sequence[int] | None = None,
        k: int = 8,
        before: int = 8,
        after: int = 4,
    ) -> None:
        self.tokenizer = tokenizer
        harvest = harvest or _hooked(coder)
        batches = activation_batches(token_batches(data, batch_size, max_steps), harvest)
        self.examples = collect_examples(batches, coder.features, indices, k=k, before=before, after=after)

    def text(self, inds: Sequence[int] | int, k: int = 3, which: Sequence[Which] = ("max", "min")) -> str:
        """Terminal text (ANSI colours) of the top ``k`` contexts of each latent."""
        lines = []
        for latent in _as_list(inds):
            lines.append(f"latent {latent}")
            for w in which:
                lines += [to_ansi(r) for r in context_records(self.examples, self.tokenizer, latent, w, k)]
        return "\n".join(lines)

    def html(self, inds: Sequence[int] | int, k: int = 3, which: Sequence[Which] = ("max", "min")) -> str:
        """HTML of the top ``k`` contexts of each latent."""
        parts = []
        for latent in _as_list(inds):
            records = [r for w in which for r in context_records(self.examples, self.tokenizer, latent, w, k)]
            parts.append(to_html(records, title=f"latent {latent}"))
        return "\n".join(parts)

    def vis(self, inds: Sequence[int] | int, k: int = 3, which: Sequence[Which] = ("max", "min")) -> None:
        """Show the contexts: rendered HTML inside Jupyter, coloured text in a terminal."""
        if _in_notebook():
            from IPython.display import HTML, display

            display(HTML(self.html(inds, k, which)))
        else:
            print(self.text(inds, k, which))

    __call__ = vis


class Manifold:
    """Tokens sampled on the manifold of a form M; ``spectrum()`` and ``manifold(k=...)`` give plotly figures."""

    def __init__(
        self,
        data: Any,
        harvest: Harvest,
        tokenizer: Any,
        form: Tensor | QuadraticForm,
        *,
        max_steps: int | None = None,
        batch_size: int | None = 32,
        total: int = 2**15,
        context: int = 8,
        predict: Predict | None = None,
    ) -> None:
        matrix = symmetrize(form.matrix if isinstance(form, QuadraticForm) else form).detach().float().cpu()
        self.axes = spectrum(matrix)
        batches = activation_batches(token_batches(data, batch_size, max_steps), _on_cpu(harvest), predict)
        self.sample = sample_manifold(batches, matrix, total, context=context, axes=self.axes)
        self.hover = hover_texts(self.sample, tokenizer)

    def spectrum(self, n: int | None = 64) -> go.Figure:
        """The form's eigenvalues by |λ|: how many dimensions the manifold really has."""
        return figures.spectrum_figure(self.axes, n=n)

    def __call__(self, k: int = 10_000) -> go.Figure:
        """3-D scatter of the ``k`` tokens with largest |x̂ᵀMx̂|."""
        return figures.manifold_figure(self.sample, self.hover, k=k)

    def to_dataframe(self, k: int | None = None) -> Any:
        """A pandas DataFrame with columns x, y, z, value, token (plus sequence, position)."""
        import pandas as pd

        points = self.sample if k is None else self.sample.top(k)
        coords = points.coords.float()
        return pd.DataFrame(
            {
                "x": coords[:, 0].tolist(),
                "y": coords[:, 1].tolist(),
                "z": coords[:, 2].tolist(),
                "value": points.values.tolist(),
                "token": self.hover[: len(points)],
                "sequence": points.sequence.tolist(),
                "position": points.position.tolist(),
            }
        )


def _hooked(coder: Autoencoder) -> Harvest:
    """``coder.hooked`` (set by ``Autoencoder.load(model, layer=...)``), or a UsageError saying what to pass."""
    hooked = getattr(coder, "hooked", None)
    if hooked is None:
        raise UsageError(
            "Feature needs a harvest function: pass one (e.g. bilae.hooks.Harvester(model, tokenizer, layer)) "
            "or load the coder with a model object, Autoencoder.load(model, layer=...), so coder.hooked exists"
        )
    return hooked


def _on_cpu(harvest: Harvest) -> Harvest:
    def wrapped(ids: Tensor, attention: Tensor) -> tuple[Tensor, Tensor]:
        acts, mask = harvest(ids, attention)
        return acts.cpu(), mask.cpu()

    return wrapped


def _as_list(inds: Sequence[int] | int | Tensor) -> list[int]:
    values = torch.as_tensor(inds).reshape(-1).tolist()
    if not values:
        raise UsageError("no latents given to show")
    return [int(v) for v in values]
