"""The hyper-parameters of an autoencoder, in the published checkpoint format."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from bilae.errors import UsageError

LOSS_MEMORY = ("auto", "blocked", "streaming")
"""Valid values of ``loss_memory`` (see :class:`AutoencoderConfig`)."""
AFFINE_PART = "affine"
"""The name part that marks the affine variant, after ``b..`` and before the tags (a tag may not use it)."""


@dataclass
class AutoencoderConfig:
    """Everything needed to rebuild an autoencoder; stored as ``config.json`` beside its weights.

    Published configs carry the keys ``layer, d_model, expansion, bottleneck, alpha, beta, kind, tags`` and may
    carry more: unknown keys are kept in ``extra`` and written back on save.
    """

    kind: str
    """Autoencoder kind: vanilla, ordered, mixed, combined or topk."""
    d_model: int
    """Width of the hooked residual stream (the input dimension d)."""
    layer: int
    """Index of the decoder block whose input is read (the residual stream entering block ``layer``)."""
    expansion: int = 16
    """Number of latents per input dimension: m = expansion · d_model."""
    bottleneck: float | None = None
    """Width of the linear bottleneck D per input dimension (b = bottleneck · d_model); mixed/combined only."""
    alpha: float = 0.0
    """Weight of the Hoyer density regulariser (activation-based sparsity)."""
    beta: float = 0.0
    """Weight of a weight-based sparsity term; kept for the published naming, unused by these kinds."""
    tags: list[str] = field(default_factory=list)
    """Free-form tags appended to the name."""
    k: int = 32
    """Active latents per token of the TopK baseline."""
    affine: bool = False
    """Off-centre latents f_j = (l_j·x̂ + a_j)(r_j·x̂ + c_j): the kind applied to the lifted input z = [1, x̂]
    (the reference's v1 biases; vanilla, ordered, mixed and combined only). Adds ``-affine`` to the name."""
    loss_memory: str = "auto"
    """How the bilinear kinds' exact loss holds its m × m terms: ``blocked`` keeps their upper-triangle blocks
    (fastest, O(m²) memory), ``streaming`` recomputes them block by block in the backward (O(N·m + m·d) memory, about
    4/3 of the FLOPs), ``auto`` picks blocked while its blocks fit half the free memory. Never changes the value."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Keys of a loaded config.json that bilae does not know; preserved, never interpreted."""

    def __post_init__(self) -> None:
        for key in ("d_model", "layer", "expansion", "k"):
            value = getattr(self, key)
            if isinstance(value, float) and value.is_integer():
                setattr(self, key, int(value))
                value = int(value)
            if not isinstance(value, int) or isinstance(value, bool):
                raise UsageError(f"{key} must be an integer, got {value!r}")
        if self.d_model <= 0:
            raise UsageError(f"d_model must be positive, got {self.d_model}")
        if self.layer < 0:
            raise UsageError(f"layer must be >= 0, got {self.layer}")
        if self.expansion <= 0:
            raise UsageError(f"expansion must be positive, got {self.expansion}")
        if self.k <= 0:
            raise UsageError(f"k must be positive, got {self.k}")
        if self.bottleneck is not None and (
            isinstance(self.bottleneck, bool)
            or not isinstance(self.bottleneck, (int, float))
            or not math.isfinite(self.bottleneck)
        ):
            raise UsageError(
                f"bottleneck must be a finite number (a multiple of d_model) or null, got {self.bottleneck!r}"
            )
        if self.bottleneck is not None and not (self.bottleneck > 0 and self.d_bottleneck > 0):
            raise UsageError(f"bottleneck must be positive (a multiple of d_model), got {self.bottleneck!r}")
        for key in ("alpha", "beta"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise UsageError(f"{key} must be a finite number >= 0, got {value!r}")
        if not isinstance(self.affine, bool):
            raise UsageError(f"affine must be true or false, got {self.affine!r}")
        if self.loss_memory not in LOSS_MEMORY:
            raise UsageError(f"loss_memory must be one of {', '.join(LOSS_MEMORY)}; got {self.loss_memory!r}")
        self._check_name_parts()

    def _check_name_parts(self) -> None:
        """Make tags a list of strings; kind and tags must be usable as parts of one folder name."""
        if self.tags is None:  # the reference writes "tags": [] but accepts None
            self.tags = []
        if isinstance(self.tags, str):
            self.tags = [self.tags]
        if not isinstance(self.tags, (list, tuple)):
            raise UsageError(f"tags must be a list of strings, got {self.tags!r}")
        self.tags = [str(t) for t in self.tags]
        check_name_part("kind", self.kind)
        for tag in self.tags:
            check_name_part("tag", tag)
        if AFFINE_PART in self.tags:
            raise UsageError(
                f"tag {AFFINE_PART!r} is reserved for the name of affine coders; set affine=true instead"
            )

    @property
    def d_features(self) -> int:
        """Number of latents m."""
        return int(self.d_model * self.expansion)

    @property
    def d_bottleneck(self) -> int:
        """Number of bottleneck rows b (0 without a bottleneck)."""
        return 0 if self.bottleneck is None else int(self.bottleneck * self.d_model)

    @property
    def name(self) -> str:
        """The published name, e.g. ``mixed-l18-x16-a20-b0`` (``mixed-l18-x16-a20-b0-affine`` when affine).

        It names a folder (``weights/<model>/<name>``, ``<repo>/<name>``): its parts hold no path syntax.
        """
        parts = [
            self.kind,
            f"l{self.layer:02d}",
            f"x{self.expansion}",
            f"a{int(self.alpha * 100)}",
            f"b{int(self.beta * 100)}",
            *([AFFINE_PART] if self.affine else []),
            *self.tags,
        ]
        return "-".join(parts)

    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "extra"]

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: known fields, then the preserved unknown keys."""
        data = {key: getattr(self, key) for key in self.fields()}
        data["tags"] = list(self.tags)
        return {**self.extra, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> AutoencoderConfig:
        """Read a (possibly published) config; unknown keys go to ``extra``, missing required keys raise."""
        missing = [key for key in ("kind", "d_model", "layer") if data.get(key) is None]
        if missing:
            raise UsageError(f"{source} has no {', '.join(missing)}; a config needs kind, d_model and layer")
        known = {key: data[key] for key in cls.fields() if key in data}
        extra = {key: value for key, value in data.items() if key not in known and key != "extra"}
        stored = data.get("extra") or {}
        if not isinstance(stored, dict):
            raise UsageError(f"{source}: extra must be a JSON object of unknown keys, got {stored!r}")
        extra.update(stored)
        return cls(**known, extra=extra)


def check_name_part(what: str, value: object) -> str:
    """Return ``value`` if it can be one folder name; refuse anything that could leave its parent folder.

    Kinds, tags, model names and checkpoint names all become path parts (``weights/<model>/<name>``).
    """
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"{what} must be a non-empty string, got {value!r}")
    if any(bad in value for bad in ("/", "\\", "..", "\0")) or value == "." or value.startswith("~"):
        raise UsageError(
            f"{what} {value!r} cannot be part of a checkpoint path "
            "(no '/', '\\', '..', a lone '.' or a leading '~')"
        )
    return value
