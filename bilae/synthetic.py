"""Planted manifolds: synthetic activations whose manifolds are known, to check that the analysis finds them.

In the spirit of the toy models of superposition: each token is a sum of sparse features (random unit directions,
each active with a small probability, with a random magnitude), and with some probability one point of one planted
manifold, plus Gaussian noise. The planted manifolds are circles (2-D) and spheres (3-D) of radius 1 in random
low-dimensional subspaces; some are shifted off the origin by a unit offset orthogonal to their subspace (an
off-centre quadric, which the affine kind represents exactly). ``bilae-train data=planted`` trains on them without
any language model; the planted subspaces are saved with the run (``planted.safetensors``), and the ``recovery``
analysis (:mod:`bilae.analysis.recovery`) scores how well the coder's composites and latent clusters span them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bilae.errors import CheckpointError, UsageError
from bilae.source import ActivationSource, SourcedDataModule

KINDS = {"circle": 2, "sphere": 3}
"""Planted manifold kinds and their dimension."""


@dataclass
class PlantedManifolds:
    """The ground truth of a planted data set."""

    kinds: list[str]
    """``circle`` or ``sphere`` per manifold."""
    bases: list[Tensor]
    """(d, k) orthonormal basis of each manifold's subspace (k = 2 for a circle, 3 for a sphere)."""
    offsets: list[Tensor]
    """(d,) each manifold's centre (zero, or a unit vector orthogonal to its subspace)."""
    features: Tensor
    """(n_features, d) unit directions of the sparse features."""

    def __len__(self) -> int:
        return len(self.kinds)

    def spans(self) -> list[Tensor]:
        """(d, k) or, off the origin, (d, k + 1) orthonormal basis of each manifold's linear span: its subspace,
        plus the offset direction for an offset one (a circle around c lies in the 3-D span of its plane and c)."""
        return [
            torch.cat([basis, offset[:, None]], 1) if float(offset.norm()) > 0 else basis
            for basis, offset in zip(self.bases, self.offsets)
        ]

    def names(self) -> list[str]:
        """``circle 0``, ``sphere 3 (offset)``, …"""
        return [
            f"{kind} {i}" + (" (offset)" if float(off.norm()) > 0 else "")
            for i, (kind, off) in enumerate(zip(self.kinds, self.offsets))
        ]

    def save(self, path: str | Path) -> Path:
        """Write the ground truth as safetensors (kinds in the metadata)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"features": self.features.contiguous()}
        for i, (basis, offset) in enumerate(zip(self.bases, self.offsets)):
            tensors[f"basis.{i}"], tensors[f"offset.{i}"] = basis.contiguous(), offset.contiguous()
        save_file(tensors, str(path), metadata={"kinds": json.dumps(self.kinds)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> PlantedManifolds:
        """Read what :meth:`save` wrote."""
        from safetensors import safe_open

        if not Path(path).is_file():
            raise CheckpointError(f"no planted manifolds at {path}; bilae-train data=planted writes them")
        with safe_open(str(path), framework="pt") as f:
            kinds = json.loads((f.metadata() or {})["kinds"])
            bases = [f.get_tensor(f"basis.{i}") for i in range(len(kinds))]
            offsets = [f.get_tensor(f"offset.{i}") for i in range(len(kinds))]
            return cls(kinds, bases, offsets, f.get_tensor("features"))


def plant(
    d_model: int, circles: int, spheres: int, offset_fraction: float, n_features: int, seed: int
) -> PlantedManifolds:
    """Random planted manifolds and feature directions; the first ``offset_fraction`` of each kind are offset."""
    g = torch.Generator().manual_seed(seed)
    kinds = ["circle"] * circles + ["sphere"] * spheres
    offset = [i < round(offset_fraction * circles) for i in range(circles)]
    offset += [i < round(offset_fraction * spheres) for i in range(spheres)]
    bases, offsets = [], []
    for kind, shifted in zip(kinds, offset):
        q = torch.linalg.qr(torch.randn(d_model, KINDS[kind] + 1, generator=g)).Q
        bases.append(q[:, :-1].contiguous())
        offsets.append(q[:, -1].clone() if shifted else torch.zeros(d_model))
    features = torch.randn(n_features, d_model, generator=g)
    return PlantedManifolds(kinds, bases, offsets, features / features.norm(dim=1, keepdim=True))


def sample_tokens(
    truth: PlantedManifolds,
    n: int,
    g: torch.Generator,
    *,
    feature_prob: float,
    manifold_prob: float,
    noise: float,
) -> tuple[Tensor, Tensor]:
    """``n`` activations and the planted manifold of each (-1: none).  → (n, d), (n,)"""
    f, d = truth.features.shape
    active = torch.rand(n, f, generator=g) < feature_prob
    x = (active * (0.5 + torch.rand(n, f, generator=g))) @ truth.features
    which = torch.randint(len(truth), (n,), generator=g)
    which = torch.where(torch.rand(n, generator=g) < manifold_prob, which, -1)
    for i, (basis, offset) in enumerate(zip(truth.bases, truth.offsets)):
        rows = (which == i).nonzero().squeeze(1)
        coords = torch.randn(len(rows), basis.shape[1], generator=g)
        x[rows] += (coords / coords.norm(dim=1, keepdim=True)) @ basis.T + offset
    return x + noise * torch.randn(n, d, generator=g) / math.sqrt(d), which


class PlantedBatches:
    """Endless training batches ``{"acts": (N, d), "mask": (N,)}``; batch i is drawn from seed (seed, i), so the
    state is just the position and a resumed run continues exactly. Its length keeps Lightning from prefetching."""

    def __init__(self, make: Any, batch_tokens: int, seed: int, length: int) -> None:
        self.make, self.batch_tokens, self.seed, self.length = make, batch_tokens, seed, length
        self.position = 0

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        if self.position >= self.length:
            self.position = 0
        while self.position < self.length:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.position)
            self.position += 1
            acts, _ = self.make(self.batch_tokens, g)
            yield {"acts": acts, "mask": torch.ones(len(acts), dtype=torch.bool)}

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])


class FixedBatches:
    """The held-out batches as one loader (a plain list would be taken for several loaders by Lightning)."""

    def __init__(self, batches: list[dict[str, Tensor]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return iter(self.batches)


class PlantedDataModule(SourcedDataModule):
    """Synthetic activations with planted circles and spheres (``data=planted``); no language model.

    Args:
        source: ``planted`` (the name ``bilae.builders`` recognises as a source of its own activations).
        d_model: width of the activations.
        circles, spheres: how many of each are planted.
        offset_fraction: share of each kind shifted off the origin (a unit offset orthogonal to its subspace).
        n_features: sparse feature directions.
        feature_prob: probability that a feature is active in a token (magnitude uniform in [0.5, 1.5]).
        manifold_prob: probability that a token holds a point of one (uniformly chosen) planted manifold.
        noise: norm scale of the Gaussian noise (per-coordinate std ``noise / sqrt(d_model)``).
        batch_tokens: tokens per training batch.
        val_tokens: held-out tokens, in sequences of ``sequence_length`` for the analysis sample.
        sequence_length: tokens per held-out "sequence" (their token id is the planted manifold + 1, 0 for none).
        planted_file: where the ground truth is written at setup (``None``: not written).
        seed: seed of the planted geometry and of every batch.
        length: training batches per "epoch" (make it at least the run's steps).
        tokenizer: ignored (there is no language model).
        activations: the activation source (no harvester; an optional shuffling buffer).
    """

    def __init__(
        self,
        source: str = "planted",
        d_model: int = 32,
        circles: int = 4,
        spheres: int = 4,
        offset_fraction: float = 0.5,
        n_features: int = 16,
        feature_prob: float = 0.02,
        manifold_prob: float = 0.8,
        noise: float = 0.05,
        batch_tokens: int = 1024,
        val_tokens: int = 4096,
        sequence_length: int = 64,
        planted_file: str | None = None,
        seed: int = 0,
        length: int = 1_000_000,
        tokenizer: Any = None,
        activations: ActivationSource | None = None,
    ) -> None:
        super().__init__(activations)
        if source != "planted":
            raise UsageError(f"PlantedDataModule makes data.source 'planted', got {source!r}")
        check_planted(d_model, circles, spheres, offset_fraction, feature_prob, manifold_prob, noise)
        if min(n_features, batch_tokens, val_tokens, sequence_length, length) <= 0:
            raise UsageError(
                "data.n_features, batch_tokens, val_tokens, sequence_length and length must be positive, got "
                f"{n_features}, {batch_tokens}, {val_tokens}, {sequence_length}, {length}"
            )
        self.truth = plant(d_model, circles, spheres, offset_fraction, n_features, seed)
        self.mix = dict(feature_prob=feature_prob, manifold_prob=manifold_prob, noise=noise)
        self.batch_tokens, self.val_tokens, self.sequence_length = batch_tokens, val_tokens, sequence_length
        self.planted_file, self.seed = planted_file, seed
        self.train = PlantedBatches(self.make, batch_tokens, seed, length)

    def make(self, n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        """``n`` activations and their planted manifold (-1: none)."""
        return sample_tokens(self.truth, n, g, **self.mix)

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.planted_file:
            self.truth.save(self.planted_file)

    def train_dataloader(self) -> PlantedBatches:
        return self.train

    def val_dataloader(self) -> FixedBatches:
        acts, mask, _, _ = self.sample_activations(None)
        flat, real = acts.reshape(-1, acts.shape[-1]), mask.reshape(-1)
        return FixedBatches(
            [
                {"acts": flat[i : i + self.batch_tokens], "mask": real[i : i + self.batch_tokens]}
                for i in range(0, len(flat), self.batch_tokens)
            ]
        )

    def sample_activations(self, sequences: int | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The held-out tokens as ``(acts (S, T, d), mask, ids, attention)``, ids = planted manifold + 1."""
        n = self.val_tokens // self.sequence_length * self.sequence_length or self.sequence_length
        acts, which = self.make(n, torch.Generator().manual_seed(self.seed * 1_000_003 - 1))
        shape = (-1, self.sequence_length)
        acts, ids = acts.reshape(*shape, acts.shape[-1]), (which + 1).reshape(shape)
        mask = torch.ones_like(ids, dtype=torch.bool)
        keep = slice(None, sequences)
        return acts[keep], mask[keep], ids[keep], mask[keep].long()


def check_planted(
    d_model: int,
    circles: int,
    spheres: int,
    offset: float,
    feature_prob: float,
    manifold_prob: float,
    noise: float,
) -> None:
    """One clear UsageError for a planted set-up that cannot be built."""
    need = 2 * circles + 3 * spheres
    if circles < 0 or spheres < 0 or circles + spheres == 0 or d_model < 4:
        raise UsageError(
            f"data.circles and data.spheres must be >= 0 with at least one manifold and data.d_model >= 4; got "
            f"circles={circles}, spheres={spheres}, d_model={d_model}"
        )
    if not (0 <= offset <= 1 and 0 <= feature_prob <= 1 and 0 <= manifold_prob <= 1 and noise >= 0):
        raise UsageError(
            "data.offset_fraction, feature_prob and manifold_prob must lie in [0, 1] and noise >= 0; got "
            f"{offset}, {feature_prob}, {manifold_prob}, {noise}"
        )
    if need + 1 > d_model:
        raise UsageError(f"{circles} circles and {spheres} spheres need d_model > {need}, got {d_model}")
