"""The engine's plan steps: glue between the numba kernels and the pool that shares their items.

Each function runs one graph node (or one part of it) on NHWC matrices; the planner
(:mod:`bnlab.inference._plan`) binds their arguments once per input shape. Shapes in comments:
M = N·H·W rows (pixels), C channels.
"""

from __future__ import annotations

import numpy as np

from bnlab.inference import _depthwise as DW
from bnlab.inference import _direct as DC
from bnlab.inference import _fused as FU
from bnlab.inference import _gemm as G
from bnlab.inference import _kernels as K
from bnlab.inference import _strips as ST
from bnlab.inference import _winograd as WG
from bnlab.inference._act import as_params
from bnlab.inference._pool import MIN_ITEM_BYTES, n_items

NO_RES = np.zeros((0, 1), np.float32)


def row_items(rows: int, n_threads: int, row_bytes: float) -> tuple:
    """[r0, r1) ranges of rows for the memory-bound kernels: 2 per thread, none moving less
    than MIN_ITEM_BYTES (a tuple: not an arena slot)."""
    parts = min(rows, n_items(rows * row_bytes, MIN_ITEM_BYTES, n_threads, per_thread=2))
    step = -(-rows // parts)
    return tuple((r, min(r + step, rows)) for r in range(0, rows, step))


def _res(residual):
    return NO_RES if residual is None else residual


def packed_gemm(pool, a, layer, out, residual):
    """out (M, C_out) = act(a (M, K) @ W · scale + shift + residual): a 1x1 conv or a linear."""
    a2 = a.reshape(out.shape[0], -1)
    res, prm, panels = _res(residual), as_params(layer.act), layer.panels
    scale, shift = layer.scale, layer.shift

    def tile(b0, b1, p0, p1):
        G.gemm_tile_range(a2, panels, out, b0, b1, p0, p1, scale, shift, res, *prm)

    pool.run(tile, G.work_items(a2.shape[0], out.shape[1], a2.shape[1], pool.n_threads))


def implicit_conv(pool, x, conv, geom, out, residual):
    """out (N·Ho·Wo, C_out) = act(im2col(x) @ W ...), im2col rows gathered per chunk."""
    res, prm = _res(residual), as_params(conv.act)
    k = conv.panels.shape[1]
    if conv.groups == 1:
        items = G.conv_work_items(out.shape[0], out.shape[1], k, pool.n_threads)
    else:  # every panel reads its own channel window: items of one panel
        rows = G.work_items(out.shape[0], G.NR, k * conv.panels.shape[0], pool.n_threads)
        items = [(b0, b1, p, p + 1) for b0, b1, _, _ in rows for p in range(conv.panels.shape[0])]

    def tile(b0, b1, p0, p1):
        G.conv_tile_range(
            x,
            geom,
            conv.ch0[p0],
            conv.chn,
            conv.panels,
            out,
            b0,
            b1,
            p0,
            p1,
            conv.scale,
            conv.shift,
            res,
            *prm,
        )

    pool.run(tile, items)


def direct_conv(pool, x, conv, xp, out_hw, out):
    """The stem: a direct conv on the zero-padded input xp (border written once)."""
    DC.pad_input(x, conv.pads[0], conv.pads[1], xp)
    (kh, kw), (sh, sw) = conv.kernel, conv.stride
    ho, wo = out_hw
    panels, prm = conv.panels.shape[0], as_params(conv.act)

    def rows(r0, r1):
        DC.direct_conv_range(
            xp,
            kh,
            kw,
            sh,
            sw,
            ho,
            wo,
            conv.panels,
            out,
            r0,
            r1,
            0,
            panels,
            conv.scale,
            conv.shift,
            *prm,
        )

    flops = 2.0 * out.size * conv.weight[0].size
    pool.run(rows, DC.work_items(x.shape[0] * ho, pool.n_threads, flops))


def winograd_conv(pool, x, conv, out, residual):
    """A 3x3 stride-1 conv by Winograd F(4x4, 3x3)."""
    up, res, prm = conv.winograd_panels(), _res(residual), as_params(conv.act)
    n, h, w, c = x.shape
    th, tw = WG.tile_grid(h, w)

    def tile(t0, t1, p0, p1):
        WG.winograd_tile_range(x, up, out, t0, t1, p0, p1, conv.scale, conv.shift, res, *prm)

    pool.run(tile, WG.work_items(n * th * tw, c, conv.c_out, pool.n_threads))


def strip_conv(pool, x, conv, geom, out, residual):
    """A depthwise or grouped conv (few channels per group) through the strip kernels."""
    res, prm = _res(residual), as_params(conv.act)

    def rows(r0, r1):
        ST.strip_rows(x, conv.taps, geom, out, r0, r1, conv.scale, conv.shift, res, *prm)

    flops = 2.0 * out.size * conv.weight[0].size
    pool.run(rows, DW.work_items(x.shape[0] * geom[8], pool.n_threads, flops))


def fused_tail(pool, a, conv, xs, second, out):
    """out = act(a @ W + xs @ W2 + b + b2): a conv and the 1x1 conv of its residual branch."""
    a2, xs2 = a.reshape(out.shape[0], -1), xs.reshape(out.shape[0], -1)
    shift, prm = conv.shift + second.shift, as_params(conv.act)
    items = G.work_items(out.shape[0], out.shape[1], a2.shape[1] + xs2.shape[1], pool.n_threads)

    def tile(b0, b1, p0, p1):
        FU.gemm2_tile_range(a2, conv.panels, xs2, second.panels, out, b0, b1, p0, p1, shift, *prm)

    pool.run(tile, items)


def se_gemm(pool, x, s, conv, out, residual, scratch):
    """out = act(((x · s) @ W)·scale + shift + residual) as, per image n, x[n] @ (diag(s[n]) W):
    the squeeze-excitation scale s (N, C_in) applied to the weight rows. x (N, HW, C_in)."""
    n_img, hw, k = x.shape
    res, prm = _res(residual), as_params(conv.act)
    for n in range(n_img):
        K.scale_panel_rows(conv.panels, s[n], scratch)
        a, o = x[n], out[n * hw : (n + 1) * hw]
        r = res[n * hw : (n + 1) * hw] if res.shape[0] else res

        def tile(b0, b1, p0, p1, a=a, o=o, r=r):
            G.gemm_tile_range(a, scratch, o, b0, b1, p0, p1, conv.scale, conv.shift, r, *prm)

        pool.run(tile, G.work_items(hw, o.shape[1], k, pool.n_threads))


def subsample(x, stride, out):
    K.subsample_nhwc(x, stride[0], stride[1], out)


def _split(pool, fn, rows: int, *arrays) -> None:
    """Run fn(r0, r1) over ``rows`` rows, shared when the arrays' traffic is worth it."""
    row_bytes = 4.0 * sum(a.size for a in arrays) / max(rows, 1)
    pool.run(fn, row_items(rows, pool.n_threads, row_bytes))


def maxpool(pool, x, geom, out):
    _split(pool, lambda r0, r1: K.maxpool_nhwc(x, geom, out, r0, r1), out.shape[0] * out.shape[1],
           x, out)  # fmt: skip


def avgpool(pool, x, geom, include_pad, out):
    _split(pool, lambda r0, r1: K.avgpool_nhwc(x, geom, include_pad, out, r0, r1),
           out.shape[0] * out.shape[1], x, out)  # fmt: skip


def adaptive_avgpool(pool, x, out):
    _split(pool, lambda r0, r1: K.adaptive_avgpool_nhwc(x, out, r0, r1),
           out.shape[0] * out.shape[1], x, out)  # fmt: skip


def global_avgpool(x, out):
    K.global_avgpool(x, out, 0, x.shape[0])


def add(pool, a, b, out, act):
    prm = as_params(act)
    _split(pool, lambda r0, r1: K.add_rows(a, b, out, r0, r1, *prm), out.shape[0], a, b, out)


def mul(pool, a, b, out):
    _split(pool, lambda r0, r1: K.mul_rows(a, b, out, r0, r1), out.shape[0], a, b, out)


def scale_channels(pool, x, s, out):
    _split(pool, lambda r0, r1: K.scale_channels(x, s, out, r0, r1), x.shape[0] * x.shape[1],
           x, out)  # fmt: skip


def affine(pool, x, scale, shift, out, act):
    prm = as_params(act)
    _split(pool, lambda r0, r1: K.affine_rows(x, scale, shift, out, r0, r1, *prm), out.shape[0],
           x, out)  # fmt: skip


def activation(pool, x, out, act):
    prm = as_params(act)
    _split(pool, lambda r0, r1: K.act_rows(x, out, r0, r1, *prm), out.shape[0], x, out)


def flatten(x, out):
    K.flatten_nchw(x, out)


def concat(parts, out):
    c0 = 0
    for p in parts:
        K.copy_columns(p, out, c0)
        c0 += p.shape[1]


def softmax(x, out):
    K.softmax_rows(x, out)
