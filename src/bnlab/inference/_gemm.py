"""An AVX-512 SGEMM with a fused epilogue, for the engine's convolutions (reference: np.matmul).

Why not ``np.matmul``: NumPy's OpenBLAS runs its AVX2 ("Haswell") kernels here (the environment
pins ``OPENBLAS_CORETYPE``). This file is a classic register-blocked GEMM (Goto/BLIS style) on
the micro-kernel of :mod:`bnlab.inference._microkernel`:

    C[i:i+6, j:j+32] = A[i:i+6, :] @ Bp[j/32]

* B (weights, (K, N)) is packed once into zero-padded panels Bp (ceil(N/32), K, 32);
* A (activations, (M, K) row-major) is read in place; the last rows (M mod 6) and the last
  columns (N mod 32) are handled by the micro-kernel's row count and lane masks;
* K is blocked by ``KC`` = 512 when larger, so that a 64 KB piece of a B panel serves an
  L2-sized chunk of A rows, and the next piece is prefetched meanwhile;
* the epilogue y = act(y·scale + shift + residual) is applied to each tile's rows while they are
  still in cache (:func:`epilogue_rows`, activations in :mod:`bnlab.inference._act`).

The implicit-GEMM convolution (:func:`conv_tile_range`) gathers the im2col rows of one chunk
at a time into an L2-sized scratch; it takes any kernel size, stride, padding and dilation, and a
window of input channels per panel for grouped convolutions.
"""

from __future__ import annotations

import numba
import numpy as np

from bnlab.inference._act import CLIP, NONE, activate_rows
from bnlab.inference._microkernel import (
    A_CHUNK_FLOATS,
    KC,
    MR,
    NR,
    microkernel,
    microkernel_pf,
    next_piece,
    prefetch_target,
)
from bnlab.inference._pool import (
    MIN_ITEM_FLOPS,
    WorkPool,
    default_threads,
    n_items,
    shared_pool,
)

__all__ = [
    "MR",
    "NR",
    "KC",
    "WorkPool",
    "conv_tile_range",
    "default_threads",
    "epilogue_rows",
    "gemm_reference",
    "gemm_tile_range",
    "pack_panels",
    "shared_pool",
    "work_items",
]

_NEG_INF, _POS_INF = np.float32(-np.inf), np.float32(np.inf)


@numba.njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")
def epilogue_rows(c, r0, r1, j0, j1, scale, shift, residual, act, pa, pb):  # pragma: no cover
    """c[r, j] = act(c[r, j]·scale[j] + shift[j] + residual[r, j]), r0 <= r < r1, j0 <= j < j1.

    ``scale`` empty means 1, ``residual`` with 0 rows means none. One branch-free loop per case
    over 1-D row views starting at j0, so that LLVM vectorizes it (indexing c[r, j] from a
    variable j0 was measured 1.6x slower); a CLIP activation (ReLU, ReLU6) is applied in the same
    loop, the others in a second pass while the rows are still in L1.
    """
    lo, hi = (pa, pb) if act == CLIP else (_NEG_INF, _POS_INF)
    nj = j1 - j0
    sh = shift[j0:j1]
    sc = scale[j0:j1] if scale.shape[0] > 0 else scale
    for r in range(r0, r1):
        cr = c[r, j0:j1]
        if sc.shape[0] == 0 and residual.shape[0] > 0:
            rr = residual[r, j0:j1]
            for j in range(nj):
                cr[j] = min(max(cr[j] + sh[j] + rr[j], lo), hi)
        elif sc.shape[0] == 0:
            for j in range(nj):
                cr[j] = min(max(cr[j] + sh[j], lo), hi)
        elif residual.shape[0] > 0:
            rr = residual[r, j0:j1]
            for j in range(nj):
                cr[j] = min(max(cr[j] * sc[j] + sh[j] + rr[j], lo), hi)
        else:
            for j in range(nj):
                cr[j] = min(max(cr[j] * sc[j] + sh[j], lo), hi)
    if act != NONE and act != CLIP:
        activate_rows(c, r0, r1, j0, j1, act, pa, pb)


# fmt: off
@numba.njit(nogil=True, cache=True, boundscheck=False)
def sweep_k(af, a_row0, k, bf, cf, m, n, c0, c1, pan0, pan1, first, last, shift, scale, rf, ldr,
            act, pa, pb):  # pragma: no cover - compiled
    """C[rows of blocks c0..c1, panels pan0..pan1] (+)= A @ B, K blocked by KC: A flat, row i
    at af[(i − a_row0)·k]; B panels flat (panels, k, 32); C flat (M, n). ``first`` overwrites
    C (else adds to it), ``last`` applies the epilogue (scale, shift, residual rf (ldr per
    row), activation act(pa, pb)) in the last K block. Each 64 KB piece of a B panel serves
    every row block of the chunk while the next piece is prefetched."""
    for kb in range(0, k, KC):
        kc = min(KC, k - kb)
        acc = 0 if first and kb == 0 else 1
        epi = 1 if last and kb + kc == k else 0
        for p in range(pan0, pan1):
            b_off = p * k * NR + kb * NR
            nxt = next_piece(p, pan0, pan1, kb, k)
            width = min(NR, n - p * NR)
            for blk in range(c0, c1):
                i = blk * MR
                pf, st = prefetch_target(b_off, nxt, blk - c0, c1 - c0, kc)
                microkernel_pf(af, (i - a_row0) * k + kb, k, bf, b_off, cf, i * n + p * NR, n,
                               kc, acc, min(MR, m - i), width, pf, st, epi, p * NR, shift, scale,
                               rf, i * ldr + p * NR, ldr, act, pa, pb)


@numba.njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")
def gemm_tile_range(a, bp, c, blk0, blk1, pan0, pan1, scale, shift, residual, act, pa,
                    pb):  # pragma: no cover - compiled
    """Rows [6·blk0, 6·blk1) ∩ [0, M) and panels [pan0, pan1) of c = epilogue(a @ B).

    a (M, K) float32 C-contiguous; bp (ceil(N/32), K, 32) packed B; c (M, N) C-contiguous;
    the epilogue (scale, shift, residual, a CLIP) is applied by the micro-kernel on the last K
    block, other activations on the finished rows while they are in L1.
    """
    m, k = a.shape
    n = c.shape[1]
    af, bf, cf, rf = a.reshape(-1), bp.reshape(-1), c.reshape(-1), residual.reshape(-1)
    ldr = residual.shape[1]
    last = min(blk1, -(-m // MR))
    pan1 = min(pan1, bp.shape[0])
    if k > KC or n > m:
        # big K or more weights than rows (the later stages at small batch): a 64 KB piece of
        # each B panel serves a whole L2-sized chunk of row blocks, so the weights are read
        # once per chunk, not once per row block
        chunk = max(1, A_CHUNK_FLOATS // (MR * KC))
        for c0 in range(blk0, last, chunk):
            c1 = min(c0 + chunk, last)
            sweep_k(af, 0, k, bf, cf, m, n, c0, c1, pan0, pan1, True, True, shift, scale, rf, ldr,
                    act, pa, pb)
    else:
        # one row block against every panel (its A rows stay in L1, C rows are written
        # contiguously)
        for blk in range(blk0, last):
            i = blk * MR
            rows = min(MR, m - i)
            for p in range(pan0, pan1):
                microkernel(af, i * k, k, bf, p * k * NR, cf, i * n + p * NR, n, k, 0, rows,
                            min(NR, n - p * NR), 1, p * NR, shift, scale, rf, i * ldr + p * NR,
                            ldr, act, pa, pb)
# fmt: on


@numba.njit(nogil=True, cache=True, boundscheck=False)
def gather_rows(x, geom, ch0, chn, r0, r1, out):  # pragma: no cover - compiled
    """out[r − r0, (i, j, q)] = x[n, oh·sh − pt + i·dh, ow·sw − pl + j·dw, ch0 + q] for the GEMM
    rows r = (n, oh, ow) in [r0, r1), 0 outside the image: the im2col rows of one chunk.
    geom = (kh, kw, sh, sw, pt, pl, dh, dw, Ho, Wo); q < chn."""
    kh, kw, sh, sw, pt, pl, dh, dw, ho, wo = geom
    h, w = x.shape[1], x.shape[2]
    for r in range(r0, r1):
        ow = r % wo
        t = r // wo
        oh = t % ho
        nn = t // ho
        row = r - r0
        for i in range(kh):
            ih = oh * sh - pt + i * dh
            for j in range(kw):
                iw = ow * sw - pl + j * dw
                base = (i * kw + j) * chn
                if 0 <= ih < h and 0 <= iw < w:
                    for q in range(chn):
                        out[row, base + q] = x[nn, ih, iw, ch0 + q]
                else:
                    for q in range(chn):
                        out[row, base + q] = 0.0


@numba.njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")
def conv_tile_range(
    x, geom, ch0, chn, bp, c, blk0, blk1, pan0, pan1, scale, shift, residual, act, pa, pb
):  # pragma: no cover - compiled
    """Implicit-GEMM convolution: rows [6·blk0, 6·blk1) and panels [pan0, pan1) of
    c = epilogue(im2col(x[..., ch0:ch0+chn]) @ B), gathering the im2col rows of each chunk into
    a scratch instead of a full (N·Ho·Wo, kh·kw·chn) matrix. x (N, H, W, C); c (N·Ho·Wo, C_out).

    K is blocked by ``KC``: for each K block, one (KC x 32) piece of a B panel (64 KB) serves
    every row block of the chunk before the next is loaded, and the chunk is sized so that its
    rows of one K block (chunk·6 x KC) fit in L2.
    """
    m, n = c.shape
    k = bp.shape[1]
    bf, cf, rf = bp.reshape(-1), c.reshape(-1), residual.reshape(-1)
    ldr = residual.shape[1]
    last = min(blk1, -(-m // MR))
    pan1 = min(pan1, bp.shape[0])
    chunk = max(1, A_CHUNK_FLOATS // (MR * min(k, KC)))
    scratch = np.empty((chunk * MR, k), np.float32)
    sf = scratch.reshape(-1)
    for c0 in range(blk0, last, chunk):
        c1 = min(c0 + chunk, last)
        r0 = c0 * MR
        r1 = min(c1 * MR, m)
        gather_rows(x, geom, ch0, chn, r0, r1, scratch)
        sweep_k(sf, r0, k, bf, cf, m, n, c0, c1, pan0, pan1, True, True, shift, scale, rf, ldr,
                act, pa, pb)  # fmt: skip


def pack_panels(w_kn: np.ndarray) -> np.ndarray:
    """B (K, N) -> panels (ceil(N/32), K, 32), zero-padded, contiguous: what the micro-kernel
    streams."""
    k, n = w_kn.shape
    n_pad = -(-n // NR) * NR
    wp = np.zeros((k, n_pad), np.float32)
    wp[:, :n] = w_kn
    return np.ascontiguousarray(wp.reshape(k, n_pad // NR, NR).transpose(1, 0, 2))


def work_items(m: int, n: int, k: int, n_threads: int) -> list[tuple[int, int, int, int]]:
    """(blk0, blk1, pan0, pan1) items: about 4 per thread, split by rows or by panels.

    Every item reads its rows of A and its panels of B once, so a row split makes each item
    stream all of B (K x N) and a panel split all of A (M x K): rows when M >= N (the first
    stages), panels when N > M (the weight-heavy later stages at small batch, where a row split
    had each of 8 items stream all of layer4's 4-8 MB weights).
    """
    blocks, panels = -(-m // MR), -(-n // NR)
    want = n_items(2.0 * m * n * k, MIN_ITEM_FLOPS, n_threads)
    by_rows = m >= n or panels < min(want, blocks)
    if by_rows:
        step = -(-blocks // want)
        return [(b, min(b + step, blocks), 0, panels) for b in range(0, blocks, step)]
    step = -(-panels // want)
    return [(0, blocks, p, min(p + step, panels)) for p in range(0, panels, step)]


def conv_work_items(m: int, n: int, k: int, n_threads: int) -> list[tuple[int, int, int, int]]:
    """:func:`work_items` for the implicit-GEMM conv: a panel split is cut into one panel group
    per thread only, because every item gathers the im2col rows of its row blocks again."""
    items = work_items(m, n, k, n_threads)
    if len(items) <= n_threads or items[0][:2] != items[-1][:2]:  # few items, or a row split
        return items
    blocks, panels = items[0][1], -(-n // NR)
    step = -(-panels // n_threads)
    return [(0, blocks, p, min(p + step, panels)) for p in range(0, panels, step)]


def gemm_reference(a, w_kn, scale, shift, residual, act=(NONE, 0.0, 0.0)):
    """The slow obvious version: np.matmul then the epilogue, in float64."""
    from bnlab.inference._act import reference  # noqa: PLC0415

    y = a.astype(np.float64) @ w_kn.astype(np.float64)
    if scale.shape[0]:
        y = y * scale
    y = y + shift
    if residual.shape[0]:
        y = y + residual
    return reference(y, act)
