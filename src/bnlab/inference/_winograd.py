"""Winograd F(4x4, 3x3) convolution for the engine's 3x3 stride-1 convs (NHWC, float32).

A 3x3 conv (padding 1, stride 1) computes each 4x4 output tile from a 6x6 input tile d (per input
channel c) as (Lavin & Gray 2016)

    Y[tile, o] = A^T ( Σ_c  U[c, o] ⊙ V[tile, c] ) A          (4x4)
    U[c, o]    = G g[o, c] G^T                                (6x6, the filter, once at compile)
    V[tile, c] = B^T d[tile, c] B                             (6x6, the input transform)

so, per transform point p = (a, b) of the 6x6 grid, the channel sum is one GEMM

    M[p] = V[p] @ U[p]         (T, C_in) @ (C_in, C_out) -> (T, C_out),   T = tiles

36 GEMMs of 2·T·C_in·C_out FLOPs each instead of the direct conv's 16·9 = 144 multiply-adds per
tile: 4x fewer multiplies (less on maps whose side is not a multiple of 4: 14x14 is covered by
16x16). The GEMMs run on bnlab's AVX-512 micro-kernel (:mod:`bnlab.inference._gemm`), U packed
once into its 32-column panels; the output transform is fused with bias (or BN scale + shift)
and ReLU.

Work is split in chunks of tiles (input transform -> 36 GEMMs -> output transform, all in one
chunk-sized scratch that stays in L2) and, for maps with few tiles, in ranges of output panels.

Accuracy: the transforms have entries up to 8 (A^T) and 5 (B^T), so rounding is larger than the
direct conv's; measured errors are in docs/inference.md and the tests bound them.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from bnlab.inference._act import CLIP, NONE, activate_rows
from bnlab.inference._microkernel import MR, NR, microkernel_pf, prefetch_target

TILE = 4  # output tile side (m)
ALPHA = 6  # input tile side m + r - 1
POINTS = ALPHA * ALPHA
MIN_TILES = 8  # below (ResNet-50 7x7 maps at batch 1: 4 tiles) the direct conv is as fast
# float32 constants: a Python float would turn the transforms into float64 arithmetic
F2, F4, F5, F8 = np.float32(2), np.float32(4), np.float32(5), np.float32(8)

BT = np.array(
    [
        [4, 0, -5, 0, 1, 0],
        [0, -4, -4, 1, 1, 0],
        [0, 4, -4, -1, 1, 0],
        [0, -2, -1, 2, 1, 0],
        [0, 2, -1, -2, 1, 0],
        [0, 4, 0, -5, 0, 1],
    ],
    dtype=np.float64,
)
G_MAT = np.array(
    [
        [1 / 4, 0, 0],
        [-1 / 6, -1 / 6, -1 / 6],
        [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6],
        [1 / 24, -1 / 12, 1 / 6],
        [0, 0, 1],
    ],
    dtype=np.float64,
)
AT = np.array(
    [
        [1, 1, 1, 1, 1, 0],
        [0, 1, -1, 2, -2, 0],
        [0, 1, 1, 4, 4, 0],
        [0, 1, -1, 8, -8, 1],
    ],
    dtype=np.float64,
)


# --------------------------------------------------------------------------- compile time


def transform_filter(w: np.ndarray) -> np.ndarray:
    """U[p, c, o] = (G w[o, c] G^T)[a, b], p = 6a + b: (C_out, C_in, 3, 3) -> (36, C_in, C_out).

    Computed in float64 (the filter is transformed once), returned as float32.
    """
    if w.ndim != 4 or w.shape[2:] != (3, 3):
        raise ValueError(f"w must be a 3x3 conv weight (C_out, C_in, 3, 3), got shape {w.shape}")
    u = np.einsum("ai,ocij,bj->abco", G_MAT, w.astype(np.float64), G_MAT)  # (6, 6, C_in, C_out)
    return np.ascontiguousarray(u.reshape(POINTS, w.shape[1], w.shape[0]), dtype=np.float32)


def pack_filter(w: np.ndarray) -> np.ndarray:
    """(C_out, C_in, 3, 3) -> U panels (36, ceil(C_out/32), C_in, 32), zero-padded: what the
    micro-kernel streams."""
    u = transform_filter(w)
    p, c_in, c_out = u.shape
    pad = -(-c_out // NR) * NR
    u = np.concatenate([u, np.zeros((p, c_in, pad - c_out), np.float32)], axis=2)
    return np.ascontiguousarray(u.reshape(p, c_in, pad // NR, NR).transpose(0, 2, 1, 3))


def tile_grid(h: int, w: int) -> tuple[int, int]:
    """Tiles per image along H and W: ceil(H/4), ceil(W/4)."""
    return -(-h // TILE), -(-w // TILE)


# --------------------------------------------------------------------------- kernels

VW = 16  # channels per vector of the input transform (one zmm register)


@intrinsic
def _bt6_vec(typingctx, src, s_off, s_step, dst, d_off, d_step):
    """dst[d_off + a·d_step + q] = (B^T d)_a, d_i = src[s_off + i·s_step + q], for q < 16 and
    a < 6: one 16-channel vector of the 1-D input transform, written in LLVM IR so that it is
    vectorized whatever LLVM can prove about aliasing (numba loops over 6 input and 6 output
    streams were left scalar)."""
    sig = types.void(src, s_off, s_step, dst, d_off, d_step)

    def codegen(context, builder, signature, args):
        src_arr, s_off_v, s_step_v, dst_arr, d_off_v, d_step_v = args
        f32, i64 = ir.FloatType(), ir.IntType(64)
        v16 = ir.VectorType(f32, VW)
        sbase = builder.gep(
            context.make_array(signature.args[0])(context, builder, src_arr).data, [s_off_v]
        )
        dbase = builder.gep(
            context.make_array(signature.args[3])(context, builder, dst_arr).data, [d_off_v]
        )

        def at(base, step, i):
            ptr = builder.gep(base, [builder.mul(step, ir.Constant(i64, i))])
            return builder.bitcast(ptr, v16.as_pointer())

        d = [builder.load(at(sbase, s_step_v, i), align=4) for i in range(ALPHA)]

        def k(c):
            return ir.Constant(v16, [c] * VW)

        add, sub, mul = builder.fadd, builder.fsub, builder.fmul
        out = [
            add(sub(mul(k(4.0), d[0]), mul(k(5.0), d[2])), d[4]),
            add(add(mul(k(-4.0), add(d[1], d[2])), d[3]), d[4]),
            add(sub(mul(k(4.0), sub(d[1], d[2])), d[3]), d[4]),
            add(sub(mul(k(2.0), sub(d[3], d[1])), d[2]), d[4]),
            add(sub(mul(k(2.0), sub(d[1], d[3])), d[2]), d[4]),
            add(sub(mul(k(4.0), d[1]), mul(k(5.0), d[3])), d[5]),
        ]
        for a, val in enumerate(out):
            builder.store(val, at(dbase, d_step_v, a), align=4)
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _input_tile(x, nn, ih0, iw0, patch, tmp, v, row):  # pragma: no cover - compiled
    """v[6a + b, row, :] = (B^T d B)[a, b] for the 6x6 patch d of x[nn] at (ih0, iw0), zero
    outside the image. patch (1, 6, 6, C) and tmp (6, 6, C) are scratch. Interior tiles are read
    from x in place, border tiles through the zero-padded patch; channels in vectors of 16
    (:func:`_bt6_vec`), the last C mod 16 by :func:`_input_tile_tail`."""
    h, w, ch = x.shape[1], x.shape[2], x.shape[3]
    if ih0 >= 0 and iw0 >= 0 and ih0 + ALPHA <= h and iw0 + ALPHA <= w:
        src, n0, i0, j0 = x, nn, ih0, iw0
    else:
        for i in range(ALPHA):
            ih = ih0 + i
            for j in range(ALPHA):
                iw = iw0 + j
                if 0 <= ih < h and 0 <= iw < w:
                    for q in range(ch):
                        patch[0, i, j, q] = x[nn, ih, iw, q]
                else:
                    for q in range(ch):
                        patch[0, i, j, q] = 0.0
        src, n0, i0, j0 = patch, 0, 0, 0
    sw = src.shape[2]
    sf, tf, vf = src.reshape(-1), tmp.reshape(-1), v.reshape(-1)
    s_base = ((n0 * src.shape[1] + i0) * sw + j0) * ch
    ntp = v.shape[1]
    q_vec = ch - ch % VW
    for q0 in range(0, q_vec, VW):
        for j in range(ALPHA):  # tmp[:, j] = B^T d[:, j]
            _bt6_vec(sf, s_base + j * ch + q0, sw * ch, tf, j * ch + q0, ALPHA * ch)
        for a in range(ALPHA):  # v[6a + b] = (tmp[a, :] B)_b
            _bt6_vec(tf, a * ALPHA * ch + q0, ch, vf, (a * ALPHA * ntp + row) * ch + q0, ntp * ch)
    if q_vec < ch:
        _input_tile_tail(src, n0, i0, j0, q_vec, tmp, v, row)


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _input_tile_tail(src, n0, i0, j0, q_lo, tmp, v, row):  # pragma: no cover - compiled
    """The input transform of the channels q_lo <= q < C, one scalar at a time (C mod 16)."""
    ch = src.shape[3]
    for j in range(ALPHA):  # tmp[:, j] = B^T d[:, j]
        jj = j0 + j
        for q in range(q_lo, ch):
            d0, d1, d2 = src[n0, i0, jj, q], src[n0, i0 + 1, jj, q], src[n0, i0 + 2, jj, q]
            d3, d4, d5 = src[n0, i0 + 3, jj, q], src[n0, i0 + 4, jj, q], src[n0, i0 + 5, jj, q]
            tmp[0, j, q] = F4 * d0 - F5 * d2 + d4
            tmp[1, j, q] = -F4 * (d1 + d2) + d3 + d4
            tmp[2, j, q] = F4 * (d1 - d2) - d3 + d4
            tmp[3, j, q] = F2 * (d3 - d1) - d2 + d4
            tmp[4, j, q] = F2 * (d1 - d3) - d2 + d4
            tmp[5, j, q] = F4 * d1 - F5 * d3 + d5
    for a in range(ALPHA):  # v[a, :] = tmp[a, :] B
        p = a * ALPHA
        for q in range(q_lo, ch):
            e0, e1, e2 = tmp[a, 0, q], tmp[a, 1, q], tmp[a, 2, q]
            e3, e4, e5 = tmp[a, 3, q], tmp[a, 4, q], tmp[a, 5, q]
            v[p, row, q] = F4 * e0 - F5 * e2 + e4
            v[p + 1, row, q] = -F4 * (e1 + e2) + e3 + e4
            v[p + 2, row, q] = F4 * (e1 - e2) - e3 + e4
            v[p + 3, row, q] = F2 * (e3 - e1) - e2 + e4
            v[p + 4, row, q] = F2 * (e1 - e3) - e2 + e4
            v[p + 5, row, q] = F4 * e1 - F5 * e3 + e5


@numba.njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")
def _output_tile(
    m, row, j0, j1, tmp, out, nn, oh0, ow0, ho, wo, scale, shift, residual, act, pa, pb
):  # pragma: no cover - compiled
    """out[(nn, oh0 + y, ow0 + x), j] = act((A^T m[:, row, j] A)[y, x]·scale + shift + residual)
    for the columns j0 <= j < j1 and the output pixels inside the map. tmp (4, 6, C_out) is
    scratch; ``residual`` (N·H·W, C_out) or 0 rows for none."""
    lo, hi = (pa, pb) if act == CLIP else (np.float32(-np.inf), np.float32(np.inf))
    for b in range(ALPHA):  # tmp[:, b] = A^T m[:, b]
        for j in range(j0, j1):
            s0, s1, s2 = m[b, row, j], m[6 + b, row, j], m[12 + b, row, j]
            s3, s4, s5 = m[18 + b, row, j], m[24 + b, row, j], m[30 + b, row, j]
            tmp[0, b, j] = s0 + s1 + s2 + s3 + s4
            tmp[1, b, j] = s1 - s2 + F2 * (s3 - s4)
            tmp[2, b, j] = s1 + s2 + F4 * (s3 + s4)
            tmp[3, b, j] = s1 - s2 + F8 * (s3 - s4) + s5
    has_scale = scale.shape[0] > 0
    has_res = residual.shape[0] > 0
    nx = min(TILE, wo - ow0)
    for y in range(min(TILE, ho - oh0)):
        base = (nn * ho + oh0 + y) * wo + ow0
        for j in range(j0, j1):
            e0, e1, e2 = tmp[y, 0, j], tmp[y, 1, j], tmp[y, 2, j]
            e3, e4, e5 = tmp[y, 3, j], tmp[y, 4, j], tmp[y, 5, j]
            z = (
                e0 + e1 + e2 + e3 + e4,
                e1 - e2 + F2 * (e3 - e4),
                e1 + e2 + F4 * (e3 + e4),
                e1 - e2 + F8 * (e3 - e4) + e5,
            )
            sc = scale[j] if has_scale else np.float32(1.0)
            t = shift[j]
            for q in range(nx):
                v = z[q] * sc + t
                if has_res:
                    v += residual[base + q, j]
                out[base + q, j] = min(max(v, lo), hi)
        if act != NONE and act != CLIP:
            activate_rows(out, base, base + nx, j0, j1, act, pa, pb)


@numba.njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")
def winograd_tile_range(
    x, up, out, t0, t1, pan0, pan1, scale, shift, residual, act, pa, pb
):  # pragma: no cover - compiled
    """Tiles [t0, t1) and output panels [pan0, pan1) of
    out = act(conv3x3(x)·scale + shift + residual).

    x (N, H, W, C_in) float32; up (36, ceil(C_out/32), C_in, 32) from :func:`pack_filter`;
    out (N·H·W, C_out); tiles are numbered (n, tile row, tile column) over a ceil(H/4) x
    ceil(W/4) grid per image; ``scale`` (C_out,) or empty; ``residual`` like out, or 0 rows.
    """
    n_img, h, w, ch = x.shape
    k_out = out.shape[1]
    n_pan = up.shape[1]
    th, tw = -(-h // TILE), -(-w // TILE)
    nt = t1 - t0
    ntp = nt
    v = np.empty((POINTS, ntp, ch), np.float32)
    m = np.empty((POINTS, ntp, k_out), np.float32)
    patch = np.empty((1, ALPHA, ALPHA, ch), np.float32)
    tmp_in = np.empty((ALPHA, ALPHA, ch), np.float32)
    tmp_out = np.empty((TILE, ALPHA, k_out), np.float32)
    for t in range(t0, t1):
        nn, r = t // (th * tw), t % (th * tw)
        _input_tile(x, nn, (r // tw) * TILE - 1, (r % tw) * TILE - 1, patch, tmp_in, v, t - t0)
    vf, uf, mf = v.reshape(-1), up.reshape(-1), m.reshape(-1)
    none, zero = np.zeros(0, np.float32), np.float32(0.0)  # no epilogue on the GEMMs
    n_blk = -(-nt // MR)
    for p in range(POINTS):  # M[p] = V[p] @ U[p], one L1-resident weight panel at a time
        for pan in range(pan0, pan1):
            b_off = (p * n_pan + pan) * ch * NR
            nxt = -1  # the next panel taken, prefetched while this one is reused
            if pan + 1 < pan1:
                nxt = b_off + ch * NR
            elif p + 1 < POINTS:
                nxt = ((p + 1) * n_pan + pan0) * ch * NR
            width = min(NR, k_out - pan * NR)
            for blk in range(n_blk):
                i = blk * MR
                pf, st = prefetch_target(b_off, nxt, blk, n_blk, ch)
                microkernel_pf(
                    vf,
                    (p * ntp + i) * ch,
                    ch,
                    uf,
                    b_off,
                    mf,
                    (p * ntp + i) * k_out + pan * NR,
                    k_out,
                    ch,
                    0,
                    min(MR, nt - i),
                    width,
                    pf,
                    st,
                    0,
                    0,
                    none,
                    none,
                    none,
                    0,
                    1,
                    0,
                    zero,
                    zero,
                )
    for t in range(t0, t1):
        nn, r = t // (th * tw), t % (th * tw)
        _output_tile(
            m,
            t - t0,
            pan0 * NR,
            min(pan1 * NR, k_out),
            tmp_out,
            out,
            nn,
            (r // tw) * TILE,
            (r % tw) * TILE,
            h,
            w,
            scale,
            shift,
            residual,
            act,
            pa,
            pb,
        )


def work_items(n_tiles: int, c_in: int, c_out: int, n_threads: int, chunk: int | None = None):
    """(t0, t1, pan0, pan1) items covering every (tile, panel) once.

    Tiles go in chunks of ``chunk`` (default :func:`chunk_tiles`); when there are fewer chunks
    than threads, each chunk is also split by output panels, into as many parts as it takes to
    give every thread an item (each part redoes the chunk's input transform, cheap next to its
    GEMMs, and streams only its panels' share of the transformed weights).
    """
    chunk = chunk or chunk_tiles(c_in, c_out)
    chunks = [(t, min(t + chunk, n_tiles)) for t in range(0, n_tiles, chunk)]
    panels = -(-c_out // NR)
    split = 1
    if len(chunks) < n_threads:
        split = min(panels, -(-n_threads // len(chunks)))
    step = -(-panels // split)
    return [(t0, t1, p, min(p + step, panels)) for t0, t1 in chunks for p in range(0, panels, step)]


def chunk_tiles(c_in: int, c_out: int) -> int:
    """Tiles per chunk: the scratch V + M (36·T·(C_in + C_out) floats) near 1 MiB of L2, but at
    least 24 rows so each weight panel is reused (a multiple of the micro-kernel's 6 rows)."""
    t = (1 << 20) // (4 * POINTS * (c_in + c_out))
    return max(24, t // MR * MR)


# --------------------------------------------------------------------------- references


def conv3x3_reference(x, w, scale, shift, relu: bool, dtype=np.float64) -> np.ndarray:
    """The slow obvious conv (padding 1, stride 1), by default in float64: x (N, H, W, C_in),
    w (C_out, C_in, 3, 3) -> act(conv·scale + shift) as (N·H·W, C_out); ``scale`` empty means 1.
    ``dtype=np.float32`` gives the direct conv's own float32 rounding, for comparison."""
    n, h, wd, _ = x.shape
    xp = np.pad(x.astype(dtype), ((0, 0), (1, 1), (1, 1), (0, 0)))
    y = np.zeros((n, h, wd, w.shape[0]), dtype)
    for i in range(3):
        for j in range(3):
            y += xp[:, i : i + h, j : j + wd, :] @ w[:, :, i, j].T.astype(dtype)
    y = y.reshape(n * h * wd, -1)
    if len(scale):
        y = y * scale.astype(dtype)
    y = y + shift.astype(dtype)
    return np.maximum(y, 0) if relu else y


def winograd_1d_reference(d: np.ndarray, g: np.ndarray) -> np.ndarray:
    """F(4, 3) in one dimension, float64: A^T ((G g) ⊙ (B^T d)), the 4 outputs of the valid
    correlation of a length-6 d with a length-3 g (the algebra the kernels implement)."""
    return AT @ ((G_MAT @ g) * (BT @ d))
