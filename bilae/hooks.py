"""Capturing the residual stream entering one block of a frozen LM, and stopping the forward pass right there.

The activation at layer N is the *input* of block N, which equals ``output_hidden_states[N]`` in Hugging Face
models. A forward pre-hook stores it and raises a private exception, so blocks N.. never run: harvesting layer 3
of 6 costs about half a forward pass.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from bilae.errors import UsageError

# Where common Hugging Face architectures keep their block list, tried in order.
LAYER_PATHS = (
    "model.layers",  # Qwen3, Qwen3.5 (text), Llama, SmolLM2, Gemma3 (text), Mistral (...ForCausalLM)
    "layers",  # their base models (Qwen3Model, LlamaModel)
    "model.language_model.layers",  # multimodal checkpoints (Qwen3.5, Gemma3 ...ForConditionalGeneration)
    "language_model.layers",  # their base models (Qwen3_5Model, Gemma3Model)
    "encoder.layer",  # BertModel
    "bert.encoder.layer",  # BertFor...
    "transformer.h",  # GPT-2 (...LMHeadModel)
    "h",  # GPT2Model
)


class _StopForward(Exception):
    """Raised by the capture hook to abandon the rest of the forward pass; never escapes this module."""


def find_layers(model: nn.Module, path: str | None = None) -> nn.ModuleList:
    """Return the list of transformer blocks of ``model``.

    Args:
        model: a Hugging Face model (or any module holding its blocks in an ``nn.ModuleList``).
        path: dotted attribute path to the block list, for architectures not in ``LAYER_PATHS``.

    Raises:
        UsageError: no block list at ``path`` (or at any known path); the message lists the paths tried.
    """
    tried = (path,) if path else LAYER_PATHS
    for candidate in tried:
        try:
            layers = functools.reduce(getattr, candidate.split("."), model)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList):
            return layers
    raise UsageError(
        f"found no block list (nn.ModuleList) in {type(model).__name__} at {', '.join(tried)}; "
        "pass the dotted path to its layers, e.g. path='model.decoder.layers'"
    )


def check_layer(layer: int, n_layers: int) -> int:
    """Return ``layer`` if it is a valid block index, else raise a UsageError stating the valid range."""
    if not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise UsageError(
            f"layer {layer!r} is out of range; this model has {n_layers} layers: valid 0..{n_layers - 1}"
        )
    return layer


def capture_layer_input(model: nn.Module, layers: nn.ModuleList, layer: int, **inputs) -> Tensor:
    """Run ``model(**inputs)`` only up to block ``layer`` and return that block's input hidden states (B, T, d)."""
    captured: list[Tensor] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        # Blocks receive the residual stream positionally (BERT, Qwen3) or as hidden_states= (some newer code).
        captured.append(args[0] if args else kwargs["hidden_states"])
        raise _StopForward

    handle = layers[check_layer(layer, len(layers))].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(**inputs)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise UsageError(f"block {layer} never ran during the forward pass of {type(model).__name__}")
    return captured[0]


class Harvester:
    """A frozen LM that turns token batches into activations at one layer, plus a mask of the tokens to keep.

    Deliberately not an ``nn.Module``: the LM must stay out of autoencoder checkpoints and optimiser parameter
    lists. Move it with ``harvester.to(device)`` (the LightningModule does that in ``setup``).

    Args:
        model: the language model (frozen here: eval mode, no gradients).
        tokenizer: its tokenizer; its ``all_special_ids`` (CLS/SEP/BOS/PAD-like) are masked out. May be None
            (``Autoencoder.load(model, layer=...)``): then the model config's bos/eos/pad ids are masked.
        layer: index of the block whose input is harvested, 0..n_layers-1.
        exclude_special: mask out special tokens as well as padding.
        sink_factor: if set, also mask tokens whose activation norm exceeds ``sink_factor`` times the median norm
            of the batch's real tokens (attention sinks have huge norms and would dominate the training signal).
        layers_path: dotted path to the block list, for architectures ``find_layers`` does not know.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        layer: int,
        *,
        exclude_special: bool = True,
        sink_factor: float | None = None,
        layers_path: str | None = None,
    ) -> None:
        if sink_factor is not None and not sink_factor > 0:
            raise UsageError(f"sink_factor must be a positive number or None, got {sink_factor!r}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.layers = find_layers(model, layers_path)
        self.layer = check_layer(layer, len(self.layers))
        self.exclude_special = exclude_special
        self.sink_factor = sink_factor
        self.special_ids = torch.tensor(special_token_ids(tokenizer, model), dtype=torch.long)
        # Causal LMs build a KV cache by default; it would be thrown away.
        self._extra = {"use_cache": False} if getattr(model.config, "use_cache", None) is not None else {}

    @property
    def n_layers(self) -> int:
        """Number of blocks in the LM."""
        return len(self.layers)

    @property
    def d_model(self) -> int:
        """Width of the residual stream."""
        return int(self.model.config.hidden_size)  # type: ignore[union-attr,arg-type]

    @property
    def device(self) -> torch.device:
        """Where the LM's weights are."""
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> Harvester:
        """Move the LM to ``device``; returns self."""
        self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Harvest activations.

        Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, T), 1 for real tokens, 0 for padding.

        Returns:
            ``(acts, mask)``: acts (B, T, d_model) in the LM's dtype (ordinary tensors, not inference tensors,
            so they can feed a module that trains); mask (B, T) bool, True for tokens to train on.
        """
        # no_grad rather than inference_mode: inference tensors cannot be saved for the autoencoder's backward.
        acts = capture_layer_input(
            self.model,
            self.layers,
            self.layer,
            input_ids=input_ids,
            attention_mask=attention_mask,
            **self._extra,
        )
        return acts, self.token_mask(input_ids, attention_mask, acts)

    def token_mask(self, input_ids: Tensor, attention_mask: Tensor, acts: Tensor | None = None) -> Tensor:
        """(B, T) bool mask of real tokens: not padding, not special (if excluded), not a sink (if filtered)."""
        mask = attention_mask.bool()
        if self.exclude_special:
            mask = mask & ~torch.isin(input_ids, self.special_ids.to(input_ids.device))
        if self.sink_factor is not None and acts is not None:
            mask = mask & ~sink_mask(acts, mask, self.sink_factor)
        return mask


def special_token_ids(tokenizer, model: nn.Module) -> list[int]:
    """The tokenizer's special token ids, or without a tokenizer the model config's bos/eos/pad ids."""
    if tokenizer is not None:
        return sorted(set(tokenizer.all_special_ids))
    config = getattr(model, "config", None)
    ids: set[int] = set()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, key, None)  # an int, a list of ints (several eos tokens) or None
        ids |= {i for i in (value if isinstance(value, list) else [value]) if isinstance(i, int)}
    return sorted(ids)


def sink_mask(acts: Tensor, mask: Tensor, factor: float) -> Tensor:
    """(B, T) bool: tokens whose norm exceeds ``factor`` × the median norm over the ``mask``ed tokens.

    Computed with a NaN-masked median, so there is no host sync and no boolean indexing.
    """
    norms = acts.float().norm(dim=-1)
    median = norms.masked_fill(~mask, float("nan")).nanmedian()
    return norms > factor * median
