"""One autoencoder plus one small activation sample: every analysis computed once, on demand.

The registered analyses (:mod:`bilae.analysis.analyses`) all ask the same questions (which latents are
interesting, their overlaps, forms, spectra, manifolds, contexts); an :class:`AnalysisSession` answers each once
and caches the answer, so two analyses asking the same thing pay once. Pure: no logging.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import cached_property
from typing import Any

import torch
from torch import Tensor, nn

from bilae.analysis.composites import CompositeAtlas, composite_atlas
from bilae.analysis.examples import ActivationExamples, collect_examples
from bilae.analysis.forms import QuadraticForm, Spectrum, latent_form, quadratic_form, spectrum
from bilae.analysis.manifold import ManifoldSample, hover_texts, sample_manifold
from bilae.analysis.notebook import activation_batches, token_batches
from bilae.analysis.overlap import (
    OverlapStats,
    bottleneck,
    check_indices,
    latent_vectors,
    overlap_rows,
    overlap_stats,
)
from bilae.autoencoders import Autoencoder
from bilae.errors import DataError

Batch = tuple[Tensor, ...]


def next_token_predictor(model: nn.Module) -> Callable[[Tensor, Tensor], Tensor] | None:
    """``predict(input_ids, attention_mask) -> (B, T)`` top next-token ids from a *full* forward of ``model``.

    ``None`` when the model has no LM head (e.g. MiniLM, a BERT encoder), so hover texts show no prediction.
    """
    from bilae.lm import lm_head

    if lm_head(model) is None:
        return None
    extra = {"use_cache": False} if getattr(model.config, "use_cache", None) is not None else {}

    @torch.no_grad()
    def predict(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        device = next(model.parameters()).device
        out = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **extra)
        return out.logits.argmax(-1)

    return predict


def harvest_sample(
    harvest: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    batch_size: int = 8,
    predict: Callable[[Tensor, Tensor], Tensor] | None = None,
    device: str | torch.device = "cpu",
) -> list[Batch]:
    """Activation batches ``(acts, mask, ids[, predicted ids])`` of some token sequences, moved to ``device``.

    Raises:
        DataError: no sequence given, or none holds a real token.
    """
    if input_ids.shape[0] == 0:
        raise DataError("the analysis sample is empty: no validation sequences to harvest")
    data = {"input_ids": input_ids, "attention_mask": attention_mask}
    harvest_device = _device_of(harvest)
    tokens = (
        {k: v.to(harvest_device) for k, v in batch.items()} for batch in token_batches(data, batch_size)
    )
    batches = [tuple(t.to(device) for t in batch) for batch in activation_batches(tokens, harvest, predict)]
    if not any(bool(b[1].any()) for b in batches):
        raise DataError(
            f"the analysis sample is empty: {input_ids.shape[0]} sequences hold no real (unmasked) tokens"
        )
    return batches


def validation_sample(
    datamodule: Any, sequences: int, *, batch_size: int = 8, device: str | torch.device | None = None
) -> list[Batch]:
    """The analysis sample of a run: its first ``sequences`` validation sequences as activation batches
    ``(acts (B, T, d), mask (B, T), input_ids (B, T)[, predictions (B, T)])``, with the model's next-token
    predictions when an LM with a head is loaded.

    A data module reading an activation cache gives the sample from the cache alone (its stored activations, token
    ids and windows), with predictions only when an LM is loaded beside it (``bilae-analyze``). Empty when there is
    neither a cache nor an LM.
    """
    harvester = datamodule.activations.harvester
    predict = None if harvester is None else next_token_predictor(harvester.model)
    if hasattr(datamodule, "sample_activations"):
        acts, mask, ids, attention = datamodule.sample_activations(sequences)
        if harvester is not None and acts.shape[-1] != harvester.d_model:
            raise DataError(
                f"the activation cache holds d_model {acts.shape[-1]}, but the loaded model has d_model "
                f"{harvester.d_model}; load the model the cache was harvested with"
            )
        where = device or (harvester.device if harvester is not None else "cpu")
        return cached_sample(acts, mask, ids, attention, batch_size=batch_size, predict=predict, device=where)
    if harvester is None:
        return []
    ids, mask = datamodule.sample_tokens(sequences)
    return harvest_sample(
        harvester, ids, mask, batch_size=batch_size, predict=predict, device=device or harvester.device
    )


def cached_sample(
    acts: Tensor,
    mask: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    batch_size: int = 8,
    predict: Callable[[Tensor, Tensor], Tensor] | None = None,
    device: str | torch.device = "cpu",
) -> list[Batch]:
    """Activation batches ``(acts, mask, ids[, predicted ids])`` of an already harvested sample (a cache).

    Raises:
        DataError: no real (unmasked) token.
    """
    if not bool(mask.any()):
        raise DataError(f"the analysis sample is empty: {len(mask)} cached sequences hold no real tokens")
    batches = []
    for start in range(0, len(input_ids), batch_size):
        part = slice(start, start + batch_size)
        batch = [acts[part], mask[part], input_ids[part]]
        if predict is not None:
            batch.append(predict(input_ids[part], attention_mask[part]).cpu())
        batches.append(tuple(t.to(device) for t in batch))
    return batches


def sample_tokenizer(datamodule: Any) -> Any:
    """The tokenizer that decodes the sample's token ids: the LM's, else the cache's own (``None``: show ids)."""
    tokenizer = datamodule.activations.tokenizer
    if tokenizer is None and hasattr(datamodule, "display_tokenizer"):
        tokenizer = datamodule.display_tokenizer()
    return tokenizer


def predictions_note(batches: Sequence[Batch], harvester: Any) -> str:
    """What the report says about next-token predictions: shown, or why they are absent."""
    if batches and all(len(b) > 3 for b in batches):
        return "shown in the manifold hover texts (the model's own LM head)"
    if harvester is None:
        return "absent: no language model is loaded (the sample comes from the activation cache)"
    return "absent: the model has no LM head"


class AnalysisSession:
    """Cached analyses of ``coder`` on a fixed activation sample.

    Args:
        coder: a bilinear autoencoder (any kind; overlaps, GED and the atlas need a bottleneck).
        batches: activation batches from :func:`harvest_sample` (may be empty for weight-only analyses).
        tokenizer: decodes token ids for hover texts and contexts (``None`` shows ids).
        other: a second autoencoder to compare with (the ``compare`` analysis; ``bilae-analyze compare=...``).
    """

    def __init__(
        self,
        coder: Autoencoder,
        batches: Sequence[Batch],
        tokenizer: Any = None,
        other: Autoencoder | None = None,
    ) -> None:
        # Analyses want float32 (eigh has no bfloat16); the trained module is never touched.
        weight = next(coder.parameters())
        self.coder = coder if weight.dtype == torch.float32 else copy.deepcopy(coder).float()
        self.device = weight.device
        self.batches = [tuple(t.to(self.device) for t in b) for b in batches]
        self.tokenizer = CachedDecoder(tokenizer) if tokenizer is not None else None
        self.m = int(self.coder.config.d_features)
        self.other = other
        self._forms: dict[tuple[int, str], QuadraticForm] = {}
        self._spectra: dict[tuple[int, str], Spectrum] = {}
        self._manifolds: dict[tuple[int, int, str], tuple[ManifoldSample, list[str]]] = {}
        self._examples: dict[tuple[int, ...], ActivationExamples] = {}
        self._atlases: dict[int | None, tuple[CompositeAtlas, Tensor]] = {}

    @property
    def has_bottleneck(self) -> bool:
        """Whether the coder has a bottleneck D (mixed, combined): needed for overlaps, GED and the atlas."""
        return getattr(self.coder, "down", None) is not None

    @property
    def kind(self) -> str:
        return str(self.coder.config.kind)

    @property
    def has_sample(self) -> bool:
        """Whether there are real tokens to project (manifolds) or quote (contexts)."""
        return self.n_tokens > 0

    @property
    def has_predictions(self) -> bool:
        """Whether the sample carries the model's next-token predictions (a model with an LM head)."""
        return bool(self.batches) and all(len(b) > 3 for b in self.batches)

    @property
    def n_tokens(self) -> int:
        """Real tokens in the sample."""
        return int(sum(int(b[1].sum()) for b in self.batches))

    @cached_property
    def stats(self) -> OverlapStats:
        """GED and participation ratio of every overlap row (raises UsageError without a bottleneck)."""
        return overlap_stats(self.coder)

    def atlas(self, rows: int | None = None) -> tuple[CompositeAtlas, Tensor]:
        """Statistics of the bottleneck composites B_k and the rows k they describe.

        Args:
            rows: analyse only this many rows, those with the largest ‖D_k‖ (``None``: all b rows). Each dense
                row costs a d×d eigen-decomposition, so all rows at d = 384, b = 768 take tens of seconds on a
                CPU. Raises UsageError without a bottleneck.
        """
        if rows not in self._atlases:
            down = bottleneck(self.coder)
            picked = torch.arange(down.shape[0], device=down.device)
            if rows is not None and rows < down.shape[0]:
                picked = down.norm(dim=1).topk(max(rows, 1)).indices.sort().values
            left, right = latent_vectors(self.coder)
            with one_thread():
                atlas = composite_atlas((left, right, down[picked]), dtype=torch.float32)
            self._atlases[rows] = (atlas, picked)
        return self._atlases[rows]

    @cached_property
    def strength(self) -> Tensor:
        """(m,) mean |f_j| over the sample's real tokens."""
        self._require_sample()
        total = torch.zeros(self.m, device=self.device)
        with torch.no_grad():
            for acts, mask, *_ in self.batches:
                if mask.any():
                    total += self.coder.features(acts[mask].float()).abs().sum(0)
        return total / max(self.n_tokens, 1)

    def choose(self, features: Sequence[int] | int | None = None, n: int = 4, skip: int = 5) -> list[int]:
        """The latents to show: ``features`` if given (checked), else the top-``n`` by GED after skipping the
        ``skip`` densest rows (the seed notebook's advice), or the top-``n`` by mean |f| without a bottleneck.
        """
        if features is not None:
            return [int(i) for i in check_indices(features, self.m)]
        if self.has_bottleneck:
            order = self.stats.ged.argsort(descending=True)
            skip = min(skip, max(self.m - n, 0))
            return [int(i) for i in order[skip : skip + n]]
        if not self.has_sample:  # no activations: the latents with the largest weights
            left, right = latent_vectors(self.coder)
            return [int(i) for i in (left.norm(dim=1) * right.norm(dim=1)).topk(min(n, self.m)).indices]
        return [int(i) for i in self.strength.topk(min(n, self.m)).indices]

    def overlap_row(self, latent: int) -> Tensor:
        """G[latent] (m,)."""
        return overlap_rows(self.coder, [latent])[0]

    def form(self, latent: int, k: int = 5, weights: str = "uniform") -> QuadraticForm:
        """The latent's form: its top-``k`` overlaps weighted as ``weights`` says (with a bottleneck, see
        :func:`~bilae.analysis.forms.latent_form`), else l rᵀ alone."""
        if (latent, weights) not in self._forms:
            if self.has_bottleneck:
                form = latent_form(self.coder, latent, k=min(k, self.m), weights=weights)
            else:
                left, right = latent_vectors(self.coder)
                idx = check_indices([latent], self.m)
                form = QuadraticForm(quadratic_form(left, right, idx), idx, torch.ones(1, device=left.device))
            self._forms[latent, weights] = form
        return self._forms[latent, weights]

    def spectrum(self, latent: int, weights: str = "uniform") -> Spectrum:
        """Eigen-decomposition of the latent's form, by |λ|."""
        if (latent, weights) not in self._spectra:
            with one_thread():
                self._spectra[latent, weights] = spectrum(self.form(latent, weights=weights).matrix)
        return self._spectra[latent, weights]

    def manifold(
        self, latent: int, k: int = 2000, weights: str = "uniform"
    ) -> tuple[ManifoldSample, list[str]]:
        """The ``k`` sampled tokens with largest |x̂ᵀMx̂| on the latent's form, and their hover texts."""
        if (latent, k, weights) not in self._manifolds:
            self._require_sample()
            form, axes = self.form(latent, weights=weights), self.spectrum(latent, weights)
            sample = sample_manifold(self.batches, form, k, axes=axes)
            self._manifolds[latent, k, weights] = (sample, hover_texts(sample, self.tokenizer))
        return self._manifolds[latent, k, weights]

    def examples(self, latents: Sequence[int], k: int = 5) -> ActivationExamples:
        """Max- and min-activating contexts of ``latents`` in the sample."""
        key = (*latents, k)
        if key not in self._examples:
            self._require_sample()
            self._examples[key] = collect_examples(self.batches, self._features, latents, k=k)
        return self._examples[key]

    def _features(self, acts: Tensor) -> Tensor:
        return self.coder.features(acts.float())

    def _require_sample(self) -> None:
        if not self.has_sample:
            raise DataError("the analysis sample is empty: no real tokens to project or show")


class CachedDecoder:
    """A tokenizer's ``decode`` with a memory: hover texts and contexts decode the same few ids thousands of
    times. Everything else is passed through to the tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[tuple[int, ...], str] = {}

    def decode(self, ids: Sequence[int], **kwargs: Any) -> str:
        if kwargs:
            return self.tokenizer.decode(ids, **kwargs)
        key = tuple(int(i) for i in ids)
        if key not in self._cache:
            self._cache[key] = self.tokenizer.decode(list(key))
        return self._cache[key]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)


@contextmanager
def one_thread() -> Iterator[None]:
    """Run CPU eigensolvers on one thread: at d ≈ 10²–10³ threads gain them little, and when the cores are
    oversubscribed (other processes, a dataloader) multi-threaded LAPACK stalls for seconds per matrix."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _device_of(harvest: Any) -> torch.device:
    device = getattr(harvest, "device", None)
    return device if isinstance(device, torch.device) else torch.device("cpu")
