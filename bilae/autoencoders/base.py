"""The autoencoder base class: a registry of kinds, input checks, masking, and save/load."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from bilae.autoencoders import checkpoint, hub
from bilae.autoencoders.config import AutoencoderConfig
from bilae.errors import CheckpointError, DataError, UsageError, unknown

if TYPE_CHECKING:
    from bilae.hooks import Harvester

Metrics = dict[str, Tensor]


class Autoencoder(nn.Module):
    """Base class of every autoencoder kind; also the entry point (``Autoencoder.from_config/load``).

    Subclasses register with ``class Vanilla(Autoencoder, kind="vanilla")`` and implement
    :meth:`_features` (on normalised tokens) and :meth:`_loss` (on the real tokens of a batch).
    """

    kinds: ClassVar[dict[str, type[Autoencoder]]] = {}
    kind: ClassVar[str]
    supports_affine: ClassVar[bool] = False
    """Whether the kind has an affine variant (``affine=True``)."""
    hooked: Harvester | None = None
    """The LM's harvester at the coder's layer, set by ``Autoencoder.load(model, layer=...)`` (else None)."""

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
        """Build a freshly initialised autoencoder of ``kind`` (vanilla, ordered, mixed, combined or topk).

        ``more`` holds the other :class:`AutoencoderConfig` fields, e.g. ``affine=True`` or ``tags=["demo"]``.
        """
        Autoencoder.resolve(kind)
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
        return Autoencoder.build(config)

    @staticmethod
    def build(config: AutoencoderConfig) -> Autoencoder:
        """A freshly initialised autoencoder for ``config``, after its kind's checks and defaults."""
        cls = Autoencoder.resolve(config.kind)
        if config.affine and not cls.supports_affine:
            valid = sorted(kind for kind, c in Autoencoder.kinds.items() if c.supports_affine)
            raise UsageError(
                f"a {config.kind} autoencoder has no affine variant (affine=true); "
                f"kinds with one: {', '.join(valid)}"
            )
        return cls(cls.prepare_config(config))

    @staticmethod
    def resolve(kind: str) -> type[Autoencoder]:
        """The class registered for ``kind``; an unknown kind names the valid ones."""
        if not isinstance(kind, str) or kind not in Autoencoder.kinds:
            raise unknown("autoencoder kind", kind, Autoencoder.kinds)
        return Autoencoder.kinds[kind]

    @classmethod
    def prepare_config(cls, config: AutoencoderConfig) -> AutoencoderConfig:
        """Fill in or check kind-specific settings (e.g. the default bottleneck)."""
        return config

    @classmethod
    def accept_published(cls, config: AutoencoderConfig) -> AutoencoderConfig:
        """Adapt a loaded config that the reference implementation accepts but :meth:`prepare_config` would
        refuse (e.g. a bottleneck on a kind without one)."""
        return config

    def __getstate__(self) -> dict[str, Any]:
        # The harvester holds the LM: copies and pickles of a coder must not drag it along.
        state = self.__dict__.copy()
        state.pop("hooked", None)
        return state

    # ------------------------------------------------------------------------------------------- forward
    @property
    def d_model(self) -> int:
        return self.config.d_model

    @property
    def d_features(self) -> int:
        return self.config.d_features

    @property
    def affine(self) -> bool:
        """Whether latents are (l·x̂ + a)(r·x̂ + c), the kind on the lifted input [1, x̂] (``config.affine``)."""
        return self.config.affine

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
        if not isinstance(x, Tensor):
            raise UsageError(
                f"activations must be a torch.Tensor, got {type(x).__name__}; convert with torch.as_tensor(x)"
            )
        if not x.is_floating_point():
            raise UsageError(f"activations must be floating point, got dtype {x.dtype}")
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
    def save(
        self,
        directory_or_model: Any,
        root: str | Path | None = None,
        push_to_hub: bool = False,
        *,
        model_name: str | None = None,
        owner: str = hub.DEFAULT_OWNER,
    ) -> Path:
        """Write ``config.json`` and ``model.safetensors``; returns the folder written.

        Two forms:

        * ``coder.save(directory)``: into ``directory`` itself.
        * ``coder.save(model, root="weights")``, the reference's call (``model`` a hub id such as
          ``"Qwen/Qwen3-0.6B-Base"`` or a model object): into ``<root>/<model>/<name>``, where the keyword
          form of :meth:`load` finds it. ``push_to_hub=True`` also uploads it to ``<owner>/<model>-scope``.

        A string or path is a directory unless ``root`` or ``push_to_hub`` is given; a model object always
        uses the reference layout (``root`` defaults to ``"weights"``).
        """
        if root is None and not push_to_hub and isinstance(directory_or_model, (str, os.PathLike)):
            return self._write(directory_or_model)
        model = hub.model_part(_model_arg(directory_or_model), model_name)
        folder = self._write(Path(root if root is not None else hub.DEFAULT_ROOT) / model / self.config.name)
        if push_to_hub:
            hub.upload(folder, hub.scope_repo(model, owner), self.config.name)
        return folder

    def push_to_hub(self, repo_id: str, *, path_in_repo: str | None = None, **options: Any) -> Any:
        """Upload this coder to hub repo ``repo_id`` as ``<path_in_repo>/{config.json,model.safetensors}``.

        ``path_in_repo`` defaults to the published name; ``options`` go to ``HfApi.upload_folder``
        (``commit_message``, ``revision``, ``token``, ...). Returns its commit info.
        Example: ``coder.push_to_hub("me/qwen3-0.6b-base-scope")``.
        """
        with tempfile.TemporaryDirectory(prefix="bilae-upload-") as tmp:
            folder = self._write(Path(tmp) / self.config.name)
            return hub.upload(folder, repo_id, path_in_repo or self.config.name, **options)

    def _write(self, directory: str | os.PathLike[str]) -> Path:
        return checkpoint.write_checkpoint(Path(directory), self.config.to_dict(), dict(self.state_dict()))

    @staticmethod
    def load(
        model_or_name: Any,
        kind: str | None = None,
        layer: int | None = None,
        expansion: int = 16,
        alpha: float = 0.0,
        beta: float = 0.0,
        tags: Sequence[str] = (),
        hf: bool = False,
        *,
        affine: bool = False,
        tokenizer: Any = None,
        model_name: str | None = None,
        root: str | Path = hub.DEFAULT_ROOT,
        owner: str = hub.DEFAULT_OWNER,
        revision: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> Autoencoder:
        """Load an autoencoder from a checkpoint folder, or by its published name as the reference does.

        Two forms:

        * ``Autoencoder.load(directory)``: a folder written by :meth:`save` or published in that layout.
        * ``Autoencoder.load(model_or_name, kind="mixed", layer=18, expansion=16, alpha=0.2, beta=0,
          tags=(), hf=False)``, the reference's call: the name (``mixed-l18-x16-a20-b0``) is built from the
          arguments and read from ``<owner>/<model>-scope`` on the hub (``hf=True``) or from
          ``<root>/<model>/<name>``. ``<model>`` is the lower-cased last part of the hub id, or of a model
          object's ``name_or_path`` (``model_name`` overrides it). Given a model object, the coder carries
          ``coder.hooked``, a :class:`bilae.hooks.Harvester` at its layer (``tokenizer`` says which special
          tokens to mask; without one the model config's bos/eos/pad ids are masked).

        The keyword form is chosen by ``layer``. The reference's v1 checkpoints (``left.weight``,
        ``left.bias``, ...) load as the affine variant; their names have no ``affine`` part, so find them
        with ``affine=False``. The stored dtype is kept unless ``dtype`` is given. Examples::

            coder = Autoencoder.load("runs/demo/autoencoder/mixed-l03-x2-a10-b0")
            coder = Autoencoder.load("Qwen/Qwen3-0.6B-Base", "mixed", layer=18, expansion=16, hf=True)
            coder = Autoencoder.load(model, layer=18, expansion=16, alpha=0.2)  # coder.hooked: layer 18
        """
        if layer is None:
            if kind is not None or hf or tags or not isinstance(model_or_name, (str, os.PathLike)):
                raise UsageError(
                    "Autoencoder.load(model_or_name, kind, ...) needs layer=<int> to build the checkpoint "
                    "name; Autoencoder.load(directory) takes a folder alone "
                    f"(got {type(model_or_name).__name__})"
                )
            return Autoencoder._load_folder(model_or_name, device=device, dtype=dtype)
        if not isinstance(hf, bool):
            raise UsageError(f"hf must be True or False, got {hf!r}")
        name = _published_name(kind or "mixed", layer, expansion, alpha, beta, tags, affine)
        model = hub.model_part(_model_arg(model_or_name), model_name)
        folder = hub.find_named(model, name, hf=hf, root=root, owner=owner, revision=revision)
        coder = Autoencoder._load_folder(folder, device=device, dtype=dtype)
        if not isinstance(model_or_name, (str, os.PathLike)):
            coder.hooked = hub.harvester_for(model_or_name, tokenizer, coder.config.layer, coder.d_model)
        return coder

    @staticmethod
    def _load_folder(
        directory: str | os.PathLike[str], *, device: str | torch.device, dtype: torch.dtype | None
    ) -> Autoencoder:
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise UsageError(
                f"dtype must be a floating torch dtype (torch.float32, torch.bfloat16, ...), got {dtype!r}"
            )
        directory = Path(directory)
        source = str(directory / checkpoint.CONFIG_FILE)
        config = AutoencoderConfig.from_dict(checkpoint.read_config(directory), source=source)
        state = checkpoint.read_weights(directory, device=device)
        if checkpoint.is_reference_v1(state):  # nn.Linear left/right with biases: the affine variant
            state, config.affine = checkpoint.from_reference_v1(state), True
        coder = Autoencoder.build(Autoencoder.resolve(config.kind).accept_published(config))
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
        folder = hub.resolve_checkpoint(repo_or_dir, name, revision=revision)
        return Autoencoder._load_folder(folder, device=device, dtype=dtype)

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
        for name, tensor in state.items():
            if not tensor.is_floating_point():
                raise CheckpointError(
                    f"{where}: tensor {name!r} has dtype {tensor.dtype}; weights must be float32, float16, bfloat16 "
                    "or float64"
                )
            if not torch.isfinite(tensor).all():
                bad = int((~torch.isfinite(tensor)).sum())
                raise CheckpointError(
                    f"{where}: tensor {name!r} holds {bad} non-finite value(s) (NaN or inf) of {tensor.numel()}; "
                    "this export is broken: use an earlier checkpoint"
                )

    def extra_repr(self) -> str:
        return f"name={self.config.name!r}, d_model={self.d_model}, d_features={self.d_features}"


def _model_arg(model_or_name: Any) -> Any:
    """A hub id or path as a string; a model object as it is."""
    return os.fspath(model_or_name) if isinstance(model_or_name, os.PathLike) else model_or_name


def _published_name(
    kind: str, layer: int, expansion: int, alpha: float, beta: float, tags: Sequence[str], affine: bool
) -> str:
    """The name the reference's loader looks for, with every argument checked as for a real config."""
    Autoencoder.resolve(kind)
    if not isinstance(tags, (str, list, tuple)):
        raise UsageError(f"tags must be a list of strings, got {tags!r}")
    tag_list = [tags] if isinstance(tags, str) else list(tags)
    config = AutoencoderConfig(
        kind=kind,
        d_model=1,
        layer=layer,
        expansion=expansion,
        alpha=alpha,
        beta=beta,
        tags=tag_list,
        affine=affine,
    )
    return config.name
