"""The fast exact kernel-trick loss: the same numbers as ``loss.py``, with a hand-written backward.

The token-summed quadratic term is ``⟨S, K'⟩`` with ``K' = P ∘ Q (∘ W)``, ``P = L Lᵀ``, ``Q = R Rᵀ``, ``W`` the
prefix matrix of the ordered kinds, and a symmetric "token Gram" ``S``:

* no bottleneck:  ``S = Hᵀ H`` with ``H = F`` (N × m);
* bottleneck D:   ``S = Dᵀ (Hᵀ H) D`` with ``H = F Dᵀ`` (N × b), since ``⟨HᵀH, D K' Dᵀ⟩ = ⟨Dᵀ HᵀH D, K'⟩``.

Every m × m matrix (S, P, Q) is symmetric, so only the blocks of its upper triangle (:func:`blocks`, a recursive
syrk-like split) are computed and kept: an off-diagonal block counts twice, a diagonal one once.  The forward never
needs ``H K'``; it keeps the blocks of S, P and Q and the backward reuses them (three elementwise products per
block, into reused scratch buffers: nothing of size m² is allocated beyond the kept blocks):

    ∂/∂H = 2 H K'              (no bottleneck)       ∂/∂L = 2 (S ∘ Q ∘ W) L
    ∂/∂H = 2 H (D K' Dᵀ)        (bottleneck)          ∂/∂R = 2 (S ∘ P ∘ W) R
    ∂/∂D = 2 (HᵀH) (D K')       (bottleneck)

For the ordered kinds ``W_ij = w_max(i,j)``, so on an off-diagonal tile (all i < j) W is the column scale ``w_J``:
the plain sum ``⟨S, K⟩`` and the weighted one ``⟨S, K ∘ W⟩`` both come from the same column sums.  The cross
term ``Σ_j c_j ‖h_j‖²`` is read off the diagonal of S (or of HᵀH) and its gradient added in place.

FLOPs (N tokens, m latents, d model width, b bottleneck rows, diagonal blocks of width T; multiply-add = 2):

    forward,  no bottleneck:  N m² (S, half) + 2 m² d (P, Q, halves)          + O(m²) elementwise
    backward, no bottleneck:  2 N m² (H K')  + 4 m² d ((S∘Q)L, (S∘P)R)        + O(m²) elementwise
    forward,  bottleneck:     2 N b² + 2 b² m + b m² (S, half) + 2 m² d
    backward, bottleneck:     2 b m² (D K') + 4 b² m + 2 N b² + 4 m² d
    (diagonal blocks are computed whole: the "halves" are really × (1 + T/m))
    The reference (autograd through ⟨GᵀG, K⟩ on full matrices) does 2 N m² + 4 m² d forward and 2 N m² + ...
    backward, with about a dozen m² temporaries.

Mixed precision: the Function runs with autocast off, in float32 (float64 stays float64; bf16/fp16 inputs are
upcast, so on a GPU the m² matmuls run in fp32/TF32), and the per-block reductions are accumulated in float64, so
a bf16 autocast region around the model still gets an fp32 loss and fp32 m² reductions; gradients come back in the
dtype of each input.  The blocks are a Python loop of plain tensor ops, which torch.compile traces (unrolled).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from bilae.autoencoders import loss as reference

DEFAULT_TILE = 512
"""Width of the diagonal blocks: big enough for efficient matmuls, small enough that computing them whole is cheap."""
MAX_BLOCK = 2048
"""Largest side of an off-diagonal block (bounds the scratch tiles; bigger matmuls gain little beyond it)."""


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
    """Drop-in fast version of :func:`bilae.autoencoders.loss.reconstruction_sums`.

    Returns ``(plain, train)`` token sums with the reference's values and the reference's gradients for
    ``train``.  For the ordered kinds ``plain`` is a metric and comes back detached; otherwise it is ``train``.
    """
    return sums_with(_Quadratic.apply, target, f, left, right, down, ordered=ordered, tile=tile)


def sums_with(
    quadratic: Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]],
    target: Tensor,
    f: Tensor,
    left: Tensor,
    right: Tensor,
    down: Tensor | None,
    *,
    ordered: bool,
    tile: int,
) -> tuple[Tensor, Tensor]:
    """``(plain, train)`` of :func:`reconstruction_sums` around a quadratic-term Function (blocked or streaming).

    ``quadratic(h, left, right, down, ordered, tile, cross_weights)`` returns ``(⟨S, K'⟩, ⟨S, K⟩,
    Σ c_j ‖h_j‖², ‖h‖²)`` as :class:`_Quadratic` does.
    """
    # The bottleneck products run in the compute dtype too: under bf16 autocast, h = F Dᵀ would be rounded.
    with torch.autocast(device_type=f.device.type, enabled=False):
        dtype = compute_dtype(f, left, right, down)
        f, down = f.to(dtype), None if down is None else down.to(dtype)
        h = f if down is None else f @ down.T  # (N, m) or (N, b)
        m = f.shape[1]
        w = reference.prefix_weights(m, like=f) if ordered else None
        # Without a bottleneck the ordered cross term Σ_j w_j f_j² is a weighted ‖h‖², done inside the Function.
        cross_weights = w if down is None else None
        quad_train, quad_plain, cross_train, cross_plain = quadratic(
            h, left, right, down, ordered, tile, cross_weights
        )
        total = target.sum()
        if not ordered:
            train = total - 2.0 * cross_train + quad_train
            return train, train
        plain = (total - 2.0 * cross_plain + quad_plain).detach()
        if down is not None:
            assert w is not None
            cross_train = ((h @ down) * f).sum(0) @ w  # Σ_j w_j g_j f_j with g = Dᵀ h
        return plain, total - 2.0 * cross_train + quad_train


def quadratic_terms(
    h: Tensor, left: Tensor, right: Tensor, down: Tensor | None, *, ordered: bool, tile: int = DEFAULT_TILE
) -> tuple[Tensor, Tensor]:
    """Token-summed ``Σ_n g_nᵀ K' g_n`` (training) and ``Σ_n g_nᵀ K g_n`` (plain) for ``g = h`` or ``g = Dᵀ h``.

    Args:
        h: (N, m) latents, or (N, b) bottleneck activations ``F Dᵀ`` when ``down`` is given.
        left, right: (m, d) atoms.
        down: (b, m) bottleneck or None.
        ordered: weight the training term by the prefix matrix W (plain is unweighted).
        tile: width of the diagonal blocks of the symmetric m × m matrices (see :func:`blocks`).

    Returns:
        ``(train, plain)`` scalars; only ``train`` is differentiable (equal to ``plain`` unless ``ordered``).
    """
    train, plain, _, _ = _Quadratic.apply(h, left, right, down, ordered, tile, None)
    return train, plain


# ---------------------------------------------------------------------------------------------- helpers
def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16/fp16 inputs are upcast for the m² reductions)."""
    return (
        torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
    )


Span = tuple[int, int]
Block = tuple[Span, Span]


def blocks(m: int, tile: int, max_block: int = MAX_BLOCK) -> list[Block]:
    """Blocks ``(rows, cols)`` covering the upper triangle of a symmetric m × m matrix exactly once.

    A recursive split (as in a recursive syrk): each range is halved, the off-diagonal rectangle between the halves
    is one block (cut into squares of at most ``max(max_block, tile)`` per side), and the halves recurse until
    they are at most ``tile`` wide; those become diagonal blocks (rows == cols).  Rows of a block always precede its columns, so an
    off-diagonal block counts twice.  Most of the work lands in few large matmuls, and the diagonal waste (computing
    a diagonal block whole) is a fraction ``tile / m`` of the symmetric half.
    """
    out: list[Block] = []
    side = max(max_block, tile)

    def split(lo: int, hi: int) -> None:
        if hi - lo <= tile:
            out.append(((lo, hi), (lo, hi)))
            return
        mid = lo + tile * -(-(hi - lo) // (2 * tile))  # about half way, on a multiple of tile; lo < mid < hi
        split(lo, mid)
        out.extend((r, c) for r in _chunks(lo, mid, side) for c in _chunks(mid, hi, side))
        split(mid, hi)

    split(0, m)
    return out


def _chunks(lo: int, hi: int, size: int) -> list[Span]:
    count = -(-(hi - lo) // size)
    step = -(-(hi - lo) // count)
    return [(start, min(start + step, hi)) for start in range(lo, hi, step)]


def tile_weight(w: Tensor, a: Span, b: Span) -> Tensor:
    """W on tile (a, b) with a ≤ b: a column scale (1, T) off the diagonal, min(w_i, w_j) on it."""
    wb = w[b[0] : b[1]]
    if a != b:
        return wb[None, :]
    return torch.minimum(wb[:, None], wb[None, :])


def cast_inputs(
    h: Tensor, left: Tensor, right: Tensor, down: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The inputs in the compute dtype (:func:`compute_dtype`); call with autocast off."""
    dtype = compute_dtype(h, left, right, down)
    return h.to(dtype), left.to(dtype), right.to(dtype), None if down is None else down.to(dtype)


def cross_sums(squares: Tensor, cross_weights: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(Σ c_j ‖h_j‖², Σ ‖h_j‖²)`` in float64 from the column squares ``‖h_j‖²`` (c = 1 when not given)."""
    cross_plain = squares.double().sum()
    cross = cross_plain.clone() if cross_weights is None else squares.double() @ cross_weights.double()
    return cross, cross_plain


def input_gradients(
    hc: Tensor,
    dc: Tensor | None,
    gram: Tensor | None,
    cw: Tensor | None,
    sums: tuple[Tensor, Tensor, Tensor],
    grad_train: Tensor,
    grad_cross: Tensor,
) -> list[Tensor | None]:
    """Gradients ``[dh, dL, dR, dD]`` (compute dtype) from the unscaled sums ``(side K', (S∘Q∘W) L, (S∘P∘W) R)``.

    ``side`` is H without a bottleneck, D with one (then ``gram`` = HᵀH); the sums are scaled in place.
    """
    out, dl, dr = sums
    scale = 2.0 * grad_train.to(hc.dtype)
    if dc is None:
        dh, dd = out.mul_(scale), None
    else:
        assert gram is not None
        core = out @ dc.T  # D K' Dᵀ (b, b)
        dh, dd = hc @ (core * scale), gram @ out.mul_(scale)
    cross_scale = 2.0 * grad_cross.to(hc.dtype)
    dh.addcmul_(hc, cross_scale if cw is None else cross_scale * cw)
    return [dh, dl.mul_(scale), dr.mul_(scale), dd]


def in_dtypes(
    grads: list[Tensor | None], dtypes: tuple[torch.dtype | None, ...]
) -> tuple[Tensor | None, ...]:
    """Each gradient in the dtype of its input."""
    return tuple(None if g is None or dt is None else g.to(dt) for g, dt in zip(grads, dtypes))


class _Quadratic(torch.autograd.Function):
    """``(h, L, R, D) ↦ (⟨S, P∘Q∘W⟩, ⟨S, P∘Q⟩, Σ c_j ‖h_j‖², ‖h‖²)`` with a backward reusing the forward's tiles.

    ``c`` are optional column weights of the cross term (the ordered kind's w); the second and fourth outputs
    are metrics without a gradient.  ``‖h_j‖²`` is read off the diagonal of S (or of HᵀH), so the cross term
    costs no pass over h, and its gradient 2 c ∘ h is added in place.
    """

    @staticmethod
    def forward(ctx, h, left, right, down, ordered, tile, cross_weights):  # type: ignore[override]
        if tile < 1:
            raise ValueError(f"tile must be positive, got {tile}")
        with torch.autocast(device_type=h.device.type, enabled=False):
            hc, lc, rc, dc = cast_inputs(h, left, right, down)
            pairs = blocks(lc.shape[0], tile)
            if dc is None:
                gram = None
                s_tiles = [hc[:, a[0] : a[1]].T @ hc[:, b[0] : b[1]] for a, b in pairs]
                squares = torch.cat([s.diagonal() for (a, b), s in zip(pairs, s_tiles) if a == b])
            else:
                gram = hc.T @ hc  # (b, b)
                y = gram @ dc  # (b, m)
                s_tiles = [dc[:, a[0] : a[1]].T @ y[:, b[0] : b[1]] for a, b in pairs]
                squares = gram.diagonal()
            p_tiles = [lc[a[0] : a[1]] @ lc[b[0] : b[1]].T for a, b in pairs]
            q_tiles = [rc[a[0] : a[1]] @ rc[b[0] : b[1]].T for a, b in pairs]
            w = reference.prefix_weights(lc.shape[0], like=lc) if ordered else None
            train, plain = _forward_sums(s_tiles, p_tiles, q_tiles, pairs, w)
            cw = None if cross_weights is None else cross_weights.to(hc.dtype)
            cross, cross_plain = cross_sums(squares, cw)
        ctx.ordered, ctx.blocks, ctx.count = ordered, pairs, len(s_tiles)
        ctx.dtypes = (h.dtype, left.dtype, right.dtype, None if down is None else down.dtype)
        ctx.has_down, ctx.has_cw = down is not None, cw is not None
        extra = ([] if gram is None else [dc, gram]) + ([] if cw is None else [cw])
        ctx.save_for_backward(hc, lc, rc, *extra, *s_tiles, *p_tiles, *q_tiles)
        ctx.mark_non_differentiable(plain, cross_plain)
        out = torch.promote_types(h.dtype, left.dtype)
        return train.to(out), plain.to(out), cross.to(out), cross_plain.to(out)

    @staticmethod
    def backward(ctx, grad_train, grad_plain, grad_cross, grad_cross_plain):  # type: ignore[override]
        saved = list(ctx.saved_tensors)
        hc, lc, rc = saved[:3]
        rest = saved[3:]
        dc = gram = cw = None
        if ctx.has_down:
            dc, gram, *rest = rest
        if ctx.has_cw:
            cw, *rest = rest
        count = ctx.count
        s_tiles, p_tiles, q_tiles = rest[:count], rest[count : 2 * count], rest[2 * count :]
        with torch.autocast(device_type=hc.device.type, enabled=False):
            sums = _backward_tiles(hc, lc, rc, dc, s_tiles, p_tiles, q_tiles, ctx.ordered, ctx.blocks)
            grads = input_gradients(hc, dc, gram, cw, sums, grad_train, grad_cross)
            return (*in_dtypes(grads, ctx.dtypes), None, None, None)


def block_sums(
    s: Tensor, p: Tensor, q: Tensor, a: Span, b: Span, w: Tensor | None, out: Tensor
) -> tuple[Tensor, Tensor]:
    """This block's float64 terms ``((2 or 1) · ⟨S, P∘Q∘W⟩, (2 or 1) · ⟨S, P∘Q⟩)`` (train is plain without w).

    ``out`` (shaped like the block, may be ``s`` itself) receives S∘P(∘Q).
    """
    weight = 1.0 if a == b else 2.0
    sp = torch.mul(s, p, out=out)
    if w is None:
        value = weight * torch.dot(sp.reshape(-1), q.reshape(-1)).double()
        return value, value
    spq = sp.mul_(q)
    if a != b:
        cols = spq.sum(0).double()
        return weight * torch.dot(cols, w[b[0] : b[1]].double()), weight * cols.sum()
    return (spq * tile_weight(w, a, b)).sum().double(), spq.sum().double()


def _forward_sums(
    s_tiles: list[Tensor],
    p_tiles: list[Tensor],
    q_tiles: list[Tensor],
    pairs: list[Block],
    w: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Σ over tile pairs of (2 or 1) · ⟨S, P∘Q∘W⟩ and ⟨S, P∘Q⟩, accumulated in float64.

    One scratch buffer (the size of the largest block) is reused for every block.
    """
    device = s_tiles[0].device
    train = torch.zeros((), dtype=torch.float64, device=device)
    plain = torch.zeros((), dtype=torch.float64, device=device)
    scratch = Scratch(s_tiles[0], max(t.numel() for t in s_tiles))
    for (a, b), s, p, q in zip(pairs, s_tiles, p_tiles, q_tiles):
        block_train, block_plain = block_sums(s, p, q, a, b, w, scratch.like(s))
        train, plain = train + block_train, plain + block_plain
    # Two distinct tensors: ``plain`` is marked non-differentiable, ``train`` is not.
    return (plain.clone() if w is None else train), plain


def _backward_tiles(
    hc: Tensor,
    lc: Tensor,
    rc: Tensor,
    dc: Tensor | None,
    s_tiles: list[Tensor],
    p_tiles: list[Tensor],
    q_tiles: list[Tensor],
    ordered: bool,
    pairs: list[Block],
) -> tuple[Tensor, Tensor, Tensor]:
    """``(side K', (S∘Q∘W) L, (S∘P∘W) R)`` with side = H (no bottleneck) or D; the caller scales them.

    Two T × T scratch tiles are reused for every pair; each tile pair costs three elementwise products.
    """
    w = reference.prefix_weights(lc.shape[0], like=lc) if ordered else None
    side = hc if dc is None else dc
    sums = (torch.zeros_like(side), torch.zeros_like(lc), torch.zeros_like(rc))
    size = max(t.numel() for t in s_tiles)
    k_buf, m_buf = Scratch(s_tiles[0], size), Scratch(s_tiles[0], size)
    for (a, b), s, p, q in zip(pairs, s_tiles, p_tiles, q_tiles):
        block_gradients(sums, side, lc, rc, (s, p, q), a, b, w, (k_buf.like(s), m_buf.like(s)))
    return sums


def block_gradients(
    sums: tuple[Tensor, Tensor, Tensor],
    side: Tensor,
    lc: Tensor,
    rc: Tensor,
    spq: tuple[Tensor, Tensor, Tensor],
    a: Span,
    b: Span,
    w: Tensor | None,
    scratch: tuple[Tensor, Tensor],
) -> None:
    """Add block (a, b)'s share to ``sums = (side K', (S∘Q∘W) L, (S∘P∘W) R)``, mirrored off the diagonal.

    ``scratch`` are two buffers shaped like the block; S, P and Q are left unchanged.
    """
    s, p, q = spq
    k_buf, m_buf = scratch
    out, dl, dr = sums
    ia, ib = slice(*a), slice(*b)
    tw = None if w is None else tile_weight(w, a, b)
    k = torch.mul(p, q, out=k_buf)
    _sym_accumulate(out, side, k if tw is None else k.mul_(tw), ia, ib)
    m1 = torch.mul(s, q, out=m_buf)
    _sym_accumulate_rows(dl, lc, m1 if tw is None else m1.mul_(tw), ia, ib)
    m2 = torch.mul(s, p, out=m_buf)
    _sym_accumulate_rows(dr, rc, m2 if tw is None else m2.mul_(tw), ia, ib)


class Scratch:
    """One flat buffer of ``size`` elements (dtype and device of ``like``), lent out as views shaped like a tile."""

    def __init__(self, like: Tensor, size: int) -> None:
        self.buffer = like.new_empty(size)

    def like(self, tile: Tensor) -> Tensor:
        """A contiguous view of the buffer with the shape of ``tile``."""
        return self.view(tile.shape)

    def view(self, shape: tuple[int, ...] | torch.Size) -> Tensor:
        """A contiguous view of the buffer with ``shape``."""
        return self.buffer[: shape[0] * shape[1]].view(shape)


def _sym_accumulate(out: Tensor, side: Tensor, k: Tensor, ia: slice, ib: slice) -> None:
    """``out += side @ K'`` restricted to tile (a, b) of the symmetric K' and, off the diagonal, its mirror."""
    out[:, ib].addmm_(side[:, ia], k)
    if ia != ib:
        out[:, ia].addmm_(side[:, ib], k.T)


def _sym_accumulate_rows(out: Tensor, atoms: Tensor, mat: Tensor, ia: slice, ib: slice) -> None:
    """``out += M @ atoms`` for tile (a, b) of a symmetric M (rows of ``atoms`` are latents)."""
    out[ia].addmm_(mat, atoms[ib])
    if ia != ib:
        out[ib].addmm_(mat.T, atoms[ia])
