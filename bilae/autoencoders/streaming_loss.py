"""The streaming exact loss: the blocked loss's numbers (``fast_loss.py``) with memory linear in the latents m.

The blocked loss keeps the upper-triangle blocks of the symmetric m × m matrices S (``HᵀH`` or ``Dᵀ(HᵀH)D``),
P = LLᵀ and Q = RRᵀ for its backward: 3·m²/2 floats, 6 GiB at m = 32768 and 24 GiB at m = 65536.  Here every block
pair (I ≤ J, at most ``tile × tile``) is formed in reused scratch buffers, used and dropped inside the loop, in the
forward and again in the backward (as flash attention recomputes its score tiles), so what is held is the inputs,
the gradients and five t × t scratch blocks: O(N·m + m·d + t²).  ``S_IJ = A_Iᵀ B_J`` with ``(A, B) = (H, H)``
without a bottleneck and ``(D, (HᵀH) D)`` with one, so a bottleneck adds b × b and b × m, never m × m.

The blocks (:func:`fast_loss.blocks` with the block side capped at ``tile``), their weights (2 off the diagonal,
the prefix weights W of the ordered kinds) and the per-block arithmetic (:func:`fast_loss.block_sums`,
:func:`fast_loss.block_gradients`) are the blocked loss's, with the same mixed-precision policy (autocast off,
float32 compute, float64 accumulation, gradients in each input's dtype).  The price is the recompute of S, P and Q
in the backward: forward N m² + 2 m² d, backward N m² + 2 m² d (recompute) + 2 N m² + 4 m² d, so about 4/3 of the
blocked loss's FLOPs.

``loss_memory`` (:class:`~bilae.autoencoders.config.AutoencoderConfig`) picks this loss or the blocked one;
:func:`resolve` turns ``auto`` into a choice from the memory the blocked loss would keep.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
from torch import Tensor

from bilae.autoencoders import fast_loss
from bilae.autoencoders import loss as reference
from bilae.autoencoders.fast_loss import Block, Scratch

DEFAULT_TILE = 2048
"""Largest side of a block pair (five float32 scratch blocks of 16 MiB).  On a 2-core CPU at m = 4096, 1024 was
slower (more, smaller blocks); 4096 changed nothing measurable at m = 8192."""
AUTO_FRACTION = 0.5
"""Fraction of free GPU memory (or available RAM on a CPU) the blocked loss's kept m² blocks may take under auto."""

log = logging.getLogger("bilae")
Sums = Callable[..., tuple[Tensor, Tensor]]


def reconstruction_sums(
    target: Tensor,
    f: Tensor,
    left: Tensor,
    right: Tensor,
    down: Tensor | None,
    *,
    ordered: bool,
    tile: int = DEFAULT_TILE,
) -> tuple[Tensor, Tensor]:
    """Drop-in streaming version of :func:`bilae.autoencoders.fast_loss.reconstruction_sums`.

    Args:
        target: (N,) ‖X‖² per token.
        f: (N, m) latents.
        left, right: (m, d) atoms.
        down: (b, m) bottleneck or None.
        ordered: average the training term over prefix lengths.
        tile: largest side of a block pair; memory beyond the inputs and gradients is 5·tile² floats.

    Returns:
        ``(plain, train)`` token sums, equal to the blocked loss's (``plain`` detached for the ordered kinds).
    """
    return fast_loss.sums_with(_Streaming.apply, target, f, left, right, down, ordered=ordered, tile=tile)


def block_pairs(m: int, tile: int) -> list[Block]:
    """The blocked loss's upper-triangle blocks with no side over ``tile`` (diagonal ones at most 512 wide)."""
    return fast_loss.blocks(m, min(tile, fast_loss.DEFAULT_TILE), max_block=tile)


# ------------------------------------------------------------------------------------------ choice
def blocked_bytes(m: int, itemsize: int = 4) -> int:
    """Bytes of the m² blocks the blocked loss keeps from forward to backward (S, P, Q) plus its two scratch blocks."""
    pairs = fast_loss.blocks(m, fast_loss.DEFAULT_TILE)
    sizes = [(r[1] - r[0]) * (c[1] - c[0]) for r, c in pairs]
    return (3 * sum(sizes) + 2 * max(sizes)) * itemsize


def memory_budget(device: torch.device) -> int:
    """:data:`AUTO_FRACTION` of the free memory of ``device``: CUDA's free memory, else the RAM available."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(AUTO_FRACTION * free)
    return int(AUTO_FRACTION * available_ram())


def available_ram() -> int:
    """Bytes of RAM available to new allocations (``MemAvailable`` of /proc/meminfo; physical memory elsewhere)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def resolve(loss_memory: str, m: int, device: torch.device, *, itemsize: int = 4, name: str = "") -> str:
    """``blocked`` or ``streaming`` for a ``loss_memory`` setting (auto, blocked or streaming).

    ``auto`` compares :func:`blocked_bytes` with :func:`memory_budget` and logs its choice; call it once per
    coder and device.
    """
    if loss_memory != "auto":
        return loss_memory
    need, budget = blocked_bytes(m, itemsize), memory_budget(device)
    choice = "blocked" if need <= budget else "streaming"
    where = "free GPU memory" if device.type == "cuda" else "available RAM"
    log.info(
        "%s: loss_memory=auto chose the %s loss (the blocked loss would keep %.3g GiB of m² blocks at m=%d; "
        "budget %.3g GiB = %.0f%% of %s)",
        name or "autoencoder", choice, need / 2**30, m, budget / 2**30, 100 * AUTO_FRACTION, where,
    )  # fmt: skip
    return choice


def sums_for(choice: str) -> Sums:
    """The ``reconstruction_sums`` of a resolved choice (``blocked`` or ``streaming``)."""
    return reconstruction_sums if choice == "streaming" else fast_loss.reconstruction_sums


# ------------------------------------------------------------------------------------------ kernel
class _Blocks:
    """Forms the blocks S_IJ = A_Iᵀ B_J, P_IJ and Q_IJ of one pair in five reused scratch buffers."""

    def __init__(self, a: Tensor, b: Tensor, left: Tensor, right: Tensor, pairs: list[Block]) -> None:
        self.a, self.b, self.left, self.right = a, b, left, right
        size = max((r[1] - r[0]) * (c[1] - c[0]) for r, c in pairs)
        self.scratch = [Scratch(left, size) for _ in range(5)]

    def products(self, rows: slice, cols: slice) -> tuple[Tensor, Tensor, Tensor]:
        """(S, P, Q) on block (rows, cols), in the first three buffers (valid until the next call)."""
        shape = (rows.stop - rows.start, cols.stop - cols.start)
        s, p, q = (buffer.view(shape) for buffer in self.scratch[:3])
        torch.mm(self.a[:, rows].T, self.b[:, cols], out=s)
        torch.mm(self.left[rows], self.left[cols].T, out=p)
        torch.mm(self.right[rows], self.right[cols].T, out=q)
        return s, p, q

    def spare(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """The two other buffers, shaped like ``like``."""
        return self.scratch[3].like(like), self.scratch[4].like(like)


def _stream_forward(blocks: _Blocks, pairs: list[Block], w: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Float64 ``(train, plain)`` sums over the block pairs, and the diagonal of S (the column squares ‖a_j‖²)."""
    zero = torch.zeros((), dtype=torch.float64, device=blocks.left.device)
    train, plain, squares = zero, zero.clone(), []
    for rows, cols in pairs:
        s, p, q = blocks.products(slice(*rows), slice(*cols))
        if rows == cols:
            squares.append(s.diagonal().clone())
        block_train, block_plain = fast_loss.block_sums(s, p, q, rows, cols, w, out=s)
        train, plain = train + block_train, plain + block_plain
    # Two distinct tensors: ``plain`` is marked non-differentiable, ``train`` is not.
    return (plain.clone() if w is None else train), plain, torch.cat(squares)


def _stream_backward(blocks: _Blocks, pairs: list[Block], w: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """``(A K', (S∘Q∘W) L, (S∘P∘W) R)`` with the blocks recomputed pair by pair; the caller scales them."""
    sums = (torch.zeros_like(blocks.a), torch.zeros_like(blocks.left), torch.zeros_like(blocks.right))
    for rows, cols in pairs:
        spq = blocks.products(slice(*rows), slice(*cols))
        scratch = blocks.spare(spq[0])
        fast_loss.block_gradients(sums, blocks.a, blocks.left, blocks.right, spq, rows, cols, w, scratch)
    return sums


class _Streaming(torch.autograd.Function):
    """``(h, L, R, D) ↦ (⟨S, P∘Q∘W⟩, ⟨S, P∘Q⟩, Σ c_j ‖h_j‖², ‖h‖²)`` as ``fast_loss._Quadratic``, keeping no block.

    The backward saves only the inputs (and HᵀH, (HᵀH) D with a bottleneck) and recomputes every block.
    """

    @staticmethod
    def forward(ctx, h, left, right, down, ordered, tile, cross_weights):  # type: ignore[override]
        if tile < 1:
            raise ValueError(f"tile must be positive, got {tile}")
        with torch.autocast(device_type=h.device.type, enabled=False):
            hc, lc, rc, dc = fast_loss.cast_inputs(h, left, right, down)
            gram = None if dc is None else hc.T @ hc  # (b, b)
            y = None if dc is None or gram is None else gram @ dc  # (b, m)
            pairs = block_pairs(lc.shape[0], tile)
            w = reference.prefix_weights(lc.shape[0], like=lc) if ordered else None
            blocks = _Blocks(hc if dc is None else dc, hc if y is None else y, lc, rc, pairs)
            train, plain, squares = _stream_forward(blocks, pairs, w)
            cw = None if cross_weights is None else cross_weights.to(hc.dtype)
            cross, cross_plain = fast_loss.cross_sums(squares if gram is None else gram.diagonal(), cw)
        ctx.ordered, ctx.tile = ordered, tile
        ctx.dtypes = (h.dtype, left.dtype, right.dtype, None if down is None else down.dtype)
        ctx.save_for_backward(hc, lc, rc, dc, gram, y, cw)
        ctx.mark_non_differentiable(plain, cross_plain)
        out = torch.promote_types(h.dtype, left.dtype)
        return train.to(out), plain.to(out), cross.to(out), cross_plain.to(out)

    @staticmethod
    def backward(ctx, grad_train, grad_plain, grad_cross, grad_cross_plain):  # type: ignore[override]
        hc, lc, rc, dc, gram, y, cw = ctx.saved_tensors
        with torch.autocast(device_type=hc.device.type, enabled=False):
            pairs = block_pairs(lc.shape[0], ctx.tile)
            w = reference.prefix_weights(lc.shape[0], like=lc) if ctx.ordered else None
            blocks = _Blocks(hc if dc is None else dc, hc if y is None else y, lc, rc, pairs)
            sums = _stream_backward(blocks, pairs, w)
            del blocks  # the scratch goes before the gradients of h and D are formed
            grads = fast_loss.input_gradients(hc, dc, gram, cw, sums, grad_train, grad_cross)
            return (*fast_loss.in_dtypes(grads, ctx.dtypes), None, None, None)
