"""The autoencoder base class: a registry of kinds, input checks, masking, and save/load."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from bilae.autoencoders import checkpoint
from bilae.autoencoders.config import AutoencoderConfig
from bilae.errors import CheckpointError, DataError, UsageError, unknown

Metrics = dict[str, Tensor]


class Autoencoder(nn.Module):
    """Base class of every autoencoder kind; also the entry point (``Autoencoder.from_config/load``).

    Subclasses register with ``class Vanilla(Autoencoder, kind="vanilla")`` and implement
    :meth:`_features` (on normalised tokens) and :meth:`_loss` (on the real tokens of a batch).
    """

    kinds: ClassVar[dict[str, type[Autoencoder]]] = {}
    kind: ClassVar[str]

    def __init_subclass__(cls, kind: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if kind is not None:
            cls.kind = kind
            Autoencoder.kinds[kind] = cls

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.config = config

    # ----------------------------------------------------------------------------------------- construction
    @staticmethod
    def from_config(
        kind: str,
        *,
        d_model: int,
        layer: int,
        expansion: int = 16,
        bottleneck: float | None = None,
        alpha: float = 0.0,
        **more: Any,
    ) -> Autoencoder:
        """Build a freshly initialised autoencoder of ``kind`` (vanilla, ordered, mixed, combined or topk)."""
        cls = Autoencoder.resolve(kind)
        allowed = set(AutoencoderConfig.fields()) - {
            "kind",
            "d_model",
            "layer",
            "expansion",
            "bottleneck",
            "alpha",
        }
        bad = sorted(set(more) - allowed)
        if bad:
            raise unknown("autoencoder option", bad[0], allowed)
        config = AutoencoderConfig(
            kind=kind,
            d_model=d_model,
            layer=layer,
            expansion=expansion,
            bottleneck=bottleneck,
            alpha=alpha,
            **more,
        )
        return cls(cls.prepare_config(config))

    @staticmethod
    def resolve(kind: str) -> type[Autoencoder]:
        """The class registered for ``kind``; an unknown kind names the valid ones."""
        if kind not in Autoencoder.kinds:
            raise unknown("autoencoder kind", kind, Autoencoder.kinds)
        return Autoencoder.kinds[kind]

    @classmethod
    def prepare_config(cls, config: AutoencoderConfig) -> AutoencoderConfig:
        """Fill in or check kind-specific settings (e.g. the default bottleneck)."""
        return config

    # ------------------------------------------------------------------------------------------- forward
    @property
    def d_model(self) -> int:
        return self.config.d_model

    @property
    def d_features(self) -> int:
        return self.config.d_features

    def normalize(self, x: Tensor) -> Tensor:
        """x̂ = x / ‖x‖₂ over the last dimension (a zero vector stays zero)."""
        self._check_input(x)
        x = x.to(self._dtype())
        return x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)

    def features(self, x: Tensor) -> Tensor:
        """Latents of activations ``x`` (..., d_model) → (..., d_features); ``x`` is L2-normalised inside."""
        return self._features(self.normalize(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)

    def loss(
        self, x: Tensor, mask: Tensor | None = None, scale: float | Tensor = 1.0
    ) -> tuple[Tensor, Metrics]:
        """Training loss on activations ``x`` (..., d_model) with a token ``mask`` (...) of real tokens.

        Returns ``(loss, metrics)``: ``loss`` is the reconstruction term plus α·scale·density, averaged over real
        tokens only; ``metrics`` holds scalar tensors, at least ``mse`` (the plain reconstruction error) and
        ``density`` (mean Hoyer density).
        """
        loss, metrics, _ = self.loss_and_features(x, mask, scale)
        return loss, metrics

    def loss_and_features(
        self, x: Tensor, mask: Tensor | None = None, scale: float | Tensor = 1.0
    ) -> tuple[Tensor, Metrics, Tensor]:
        """:meth:`loss`, plus the latents of the real tokens (N, m) it computed on the way."""
        xhat = self.normalize(self.real_tokens(x, mask))
        return self._loss(xhat, scale)

    def real_tokens(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """The (N, d) rows of ``x`` whose mask is true; an empty selection is an error."""
        self._check_input(x)
        if mask is None:
            tokens = x.reshape(-1, x.shape[-1])
        else:
            if mask.shape != x.shape[:-1]:
                raise UsageError(
                    f"mask shape {tuple(mask.shape)} does not match activations {tuple(x.shape)}"
                )
            tokens = x[mask.bool()]
        if tokens.shape[0] == 0:
            raise DataError(
                f"the batch has no real tokens (all {x[..., 0].numel()} are masked); nothing to fit"
            )
        return tokens

    def _check_input(self, x: Tensor) -> None:
        if x.ndim == 0 or x.shape[-1] != self.d_model:
            raise UsageError(
                f"activations of shape {tuple(x.shape)} do not fit this autoencoder: the last dimension must be "
                f"d_model={self.d_model}"
            )

    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _features(self, xhat: Tensor) -> Tensor:
        raise NotImplementedError

    def _loss(self, xhat: Tensor, scale: float | Tensor) -> tuple[Tensor, Metrics, Tensor]:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ save/load
    def save(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory``; returns the directory."""
        return checkpoint.write_checkpoint(directory, self.config.to_dict(), dict(self.state_dict()))

    @staticmethod
    def load(
        directory: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> Autoencoder:
        """Load a checkpoint folder written by :meth:`save` or published in the same layout.

        The stored dtype is kept unless ``dtype`` is given.
        """
        source = str(Path(directory) / checkpoint.CONFIG_FILE)
        config = AutoencoderConfig.from_dict(checkpoint.read_config(directory), source=source)
        cls = Autoencoder.resolve(config.kind)
        state = checkpoint.read_weights(directory, device=device)
        coder = cls(cls.prepare_config(config))
        coder._check_state(state, directory)
        stored = next(iter(state.values())).dtype if state else None
        coder = coder.to(device=device, dtype=dtype or stored)
        coder.load_state_dict(state)
        return coder

    @staticmethod
    def from_pretrained(
        repo_or_dir: str | Path,
        name: str,
        *,
        revision: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> Autoencoder:
        """Load ``<repo>/<name>/`` from a local folder of that layout or from the Hugging Face hub.

        Example: ``Autoencoder.from_pretrained("tdooms/qwen3-0.6b-base-scope", "mixed-l18-x16-a100-b0")``.
        """
        from bilae.autoencoders.hub import resolve_checkpoint

        return Autoencoder.load(
            resolve_checkpoint(repo_or_dir, name, revision=revision), device=device, dtype=dtype
        )

    def _check_state(self, state: dict[str, Tensor], directory: str | Path) -> None:
        expected = {name: tuple(t.shape) for name, t in self.state_dict().items()}
        found = {name: tuple(t.shape) for name, t in state.items()}
        where = Path(directory) / checkpoint.WEIGHTS_FILE
        if set(found) != set(expected):
            raise CheckpointError(
                f"{where} holds tensors {sorted(found)}, but a {self.kind} autoencoder needs {sorted(expected)}"
            )
        for name, shape in expected.items():
            if found[name] != shape:
                raise CheckpointError(
                    f"{where}: tensor {name!r} has shape {found[name]}, but the config "
                    f"(d_model={self.d_model}, expansion={self.config.expansion}, "
                    f"bottleneck={self.config.bottleneck}) needs {shape}"
                )

    def extra_repr(self) -> str:
        return f"name={self.config.name!r}, d_model={self.d_model}, d_features={self.d_features}"
