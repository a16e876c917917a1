"""Planning a forward pass of the compiled ResNet: buffers and a flat list of steps.

A :class:`Planner` walks the network once per input shape (and per thread pool) and emits steps
``(function, *args)``; an argument that is a list is an arena slot, resolved once the arena is
allocated. The step functions below are the glue between the engine's numba kernels (GEMM,
Winograd, pooling) and the pool that shares their work items.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bnlab.inference import _direct as DC
from bnlab.inference import _fused as FU
from bnlab.inference import _gemm as G
from bnlab.inference import _kernels as K
from bnlab.inference import _winograd as WG
from bnlab.inference._packing import EMPTY, PackedBlock, PackedConv


@dataclass
class Plan:
    """Buffers and views for one input shape (N, H, W)."""

    x_nhwc: np.ndarray
    steps: list = field(default_factory=list)
    logits: np.ndarray | None = None
    labels: list = field(default_factory=list)  # one per step: kind and kernel size, for profiles


class _Arena:
    """Flat float32 buffers by role, grown to the largest size any layer asks for."""

    def __init__(self):
        self.sizes: dict[str, int] = {}
        self.requests: list[tuple[str, tuple[int, ...], list]] = []

    def request(self, role: str, shape: tuple[int, ...]) -> list:
        slot: list = []
        self.sizes[role] = max(self.sizes.get(role, 0), int(np.prod(shape)))
        self.requests.append((role, shape, slot))
        return slot

    def materialize(self) -> None:
        flat = {r: np.empty(n, np.float32) for r, n in self.sizes.items()}
        for role, shape, slot in self.requests:
            slot.append(flat[role][: int(np.prod(shape))].reshape(shape))


class Planner:
    """Turns a CompiledResNet's packed layers into a :class:`Plan` whose parallel steps run on
    ``pool`` (the engine's shared pool, or a one-thread pool for a batch lane)."""

    def __init__(self, net, pool: G.WorkPool):
        self.net = net
        self.pool = pool

    def build(self, n: int, h0: int, w0: int) -> Plan:
        """Every step of one forward pass for input (n, 3, h0, w0), buffers allocated."""
        arena = _Arena()
        x_slot = arena.request("input", (n, h0, w0, 3))
        steps: list = []
        cur, (h, w) = self._plan_stem(arena, steps, x_slot, n, h0, w0)
        for i, blk in enumerate(self.net.blocks):  # block outputs alternate between two buffers
            cur, (h, w) = self._plan_block(arena, steps, blk, cur, n, h, w, "a" if i % 2 else "b")
        logits = self._plan_head(arena, steps, cur, n, h, w)
        arena.materialize()
        return Plan(x_slot[0], [_bind(s) for s in steps], logits, [_label(s) for s in steps])

    def _plan_conv(self, arena, steps, conv: PackedConv, src, n, h, w, out_role, residual=None,
                   relu=True):  # fmt: skip
        """GEMM (after im2col when k > 1 or strided) + epilogue; returns (out slot, (Ho, Wo))."""
        ho, wo = conv.out_hw(h, w)
        c_in = conv.w.shape[0] // (conv.k * conv.k)
        out = arena.request(out_role, (n * ho * wo, conv.c_out))
        if conv.k == 1 and conv.stride == 1:
            a = src
        elif conv.k == 1:
            sub = arena.request("sub", (n, ho, wo, c_in))
            steps.append((_subsample, src, (n, h, w, c_in), conv.stride, sub))
            a = sub
        elif self._use_winograd(conv, n, h, w, residual):
            steps.append((_winograd_conv, self.pool, src, (n, h, w, c_in), conv, out, relu))
            return out, (ho, wo)
        elif self._use_direct(conv, c_in, residual):
            xp = np.zeros(DC.padded_shape(n, h, w, c_in, conv.k, conv.stride, conv.pad), np.float32)
            steps.append((_direct_conv, self.pool, src, (n, h, w, c_in), conv, xp, (ho, wo), out,
                          relu))  # fmt: skip
            return out, (ho, wo)
        elif self.net.gemm == "packed" and conv.panels is not None:  # implicit GEMM: no im2col
            steps.append((_packed_conv, self.pool, src, (n, h, w, c_in), conv, (ho, wo), out,
                          residual, relu))  # fmt: skip
            return out, (ho, wo)
        else:
            col = arena.request("col", (n * ho * wo, conv.w.shape[0]))
            steps.append((_im2col, self.pool, src, (n, h, w, c_in), conv, col, _row_items(n * ho,
                          self.pool.n_threads)))  # fmt: skip
            a = col
        self._plan_gemm(steps, a, conv, conv.shift, out, residual, relu)
        return out, (ho, wo)

    def _use_direct(self, conv: PackedConv, c_in: int, residual) -> bool:
        """The direct conv on a padded input for few input channels (the stem: 3), where the
        implicit GEMM's im2col gather would cost as much as the GEMM (measured 2.3 -> 1.4 ms)."""
        packed = self.net.gemm == "packed" and conv.panels is not None
        return packed and conv.k > 1 and c_in < 16 and residual is None

    def _use_winograd(self, conv: PackedConv, n, h, w, residual) -> bool:
        """Winograd for 3x3 stride-1 convs with enough tiles to reuse the 4x larger transformed
        weights (measured: ResNet's 7x7 maps at batch 1, 4 tiles, are faster direct)."""
        if not (self.net.winograd and self.net.gemm == "packed" and conv.panels is not None):
            return False
        if (conv.k, conv.stride, conv.pad) != (3, 1, 1) or residual is not None:
            return False
        th, tw = WG.tile_grid(h, w)
        return n * th * tw >= WG.MIN_TILES

    def _plan_gemm(self, steps, a, conv: PackedConv, shift, out, residual, relu) -> None:
        """out = epilogue(a @ W): one fused parallel step (packed), or np.matmul + a pass."""
        k = conv.w.shape[0]
        if self.net.gemm == "packed" and conv.panels is not None:
            steps.append((_packed_gemm, self.pool, a, k, conv.panels, out, conv.scale, shift,
                          residual, relu))  # fmt: skip
        else:
            steps.append((_gemm, a, k, conv.w, out))
            steps.append((_epilogue, out, conv.scale, shift, residual, relu))

    def _plan_stem(self, arena, steps, x_slot, n, h, w):
        out, (h, w) = self._plan_conv(arena, steps, self.net.stem, x_slot, n, h, w, "stem")
        ho, wo = (h + 2 - 3) // 2 + 1, (w + 2 - 3) // 2 + 1
        pooled = arena.request("a", (n, ho, wo, self.net.stem.c_out))
        items = _row_items(n * ho, self.pool.n_threads)
        steps.append((_maxpool, self.pool, out, (n, h, w, self.net.stem.c_out), pooled, items))
        return pooled, (ho, wo)

    def _plan_block(self, arena, steps, blk: PackedBlock, x, n, h, w, out_role):
        t1, _ = self._plan_conv(arena, steps, blk.conv1, x, n, h, w, "t1")
        t2, (ho, wo) = self._plan_conv(arena, steps, blk.conv2, t1, n, h, w, "t2")
        if self._fuse_downsample(blk):
            return self._plan_fused_tail(arena, steps, blk, t2, x, n, h, w, out_role), (ho, wo)
        identity = x
        if blk.downsample is not None:
            identity, _ = self._plan_conv(arena, steps, blk.downsample, x, n, h, w, "ds",
                                          relu=False)  # fmt: skip
        y, _ = self._plan_conv(arena, steps, blk.conv3, t2, n, ho, wo, out_role, residual=identity)
        return y, (ho, wo)

    def _fuse_downsample(self, blk: PackedBlock) -> bool:
        """conv3 and the downsample branch as one two-segment GEMM (:mod:`._fused`): packed GEMM,
        folded BN (plain biases), 1x1 downsample."""
        ds, c3 = blk.downsample, blk.conv3
        if ds is None or self.net.gemm != "packed" or ds.k != 1:
            return False
        folded = ds.scale.size == 0 and c3.scale.size == 0
        return folded and ds.panels is not None and c3.panels is not None

    def _plan_fused_tail(self, arena, steps, blk: PackedBlock, t2, x, n, h, w, out_role):
        """Y = relu(T2 @ W3 + Xs @ Wd + b3 + bd), Xs = X subsampled by the downsample's stride."""
        ds, c3 = blk.downsample, blk.conv3
        ho, wo = ds.out_hw(h, w)
        c_in = ds.w.shape[0]
        xs = x
        if ds.stride > 1:
            xs = arena.request("sub", (n, ho, wo, c_in))
            steps.append((_subsample, x, (n, h, w, c_in), ds.stride, xs))
        y = arena.request(out_role, (n * ho * wo, c3.c_out))
        steps.append((_fused_tail, self.pool, t2, c3, xs, ds, y, c3.shift + ds.shift))
        return y

    def _plan_head(self, arena, steps, feat, n, h, w):
        c = self.net.fc_w.shape[0]
        pooled = arena.request("pooled", (n, c))
        steps.append((_avgpool, feat, (n, h * w, c), pooled))
        if self.net.gemm == "packed":
            logits = arena.request("logits", (n, self.net.fc.panels.shape[0] * G.NR))
            self._plan_gemm(
                steps, pooled, self.net.fc, self.net.fc_shift_padded, logits, None, False
            )
        else:
            logits = arena.request("logits", (n, self.net.fc_w.shape[1]))
            self._plan_gemm(steps, pooled, self.net.fc, self.net.fc_b, logits, None, False)
        return logits


# --------------------------------------------------------------------------- plan steps
# A step is (function, *args) where a list argument is an arena slot holding one view; _bind
# resolves the slots once, after the arena is materialized, into a zero-argument closure.


def _bind(step):
    fn, *args = step
    resolved = [a[0] if isinstance(a, list) else a for a in args]
    return lambda: fn(*resolved)


def _label(step) -> str:
    """'packed_conv 3x3', 'winograd_conv 3x3', 'packed_gemm 1x1', 'maxpool'...: what a step is."""
    fn, *args = step
    conv = next((a for a in args if isinstance(a, PackedConv)), None)
    kind = fn.__name__.lstrip("_")
    return kind if conv is None else f"{kind} {conv.k}x{conv.k}" + (
        f"/{conv.stride}" if conv.stride > 1 else "")  # fmt: skip


def _as4(a, shape):
    return a.reshape(shape)


def _row_items(rows: int, n_threads: int) -> tuple[tuple[int, int], ...]:
    """[r0, r1) ranges of output rows for the parallel glue kernels (2 per thread)."""
    parts = max(1, min(rows, 2 * n_threads if n_threads > 1 else 1))
    step = -(-rows // parts)
    return tuple((r, min(r + step, rows)) for r in range(0, rows, step))  # a tuple: not a slot


def _im2col(pool, src, shape4, conv, col, items):
    x = _as4(src, shape4)
    pool.run(lambda r0, r1: K.im2col_nhwc(x, conv.k, conv.k, conv.stride, conv.pad, col, r0, r1),
             items)  # fmt: skip


def _subsample(src, shape4, stride, sub):
    K.subsample_nhwc(_as4(src, shape4), stride, sub)


def _gemm(a, k, w, out):
    np.matmul(a.reshape(-1, k), w, out=out)


def _packed_gemm(pool, a, k, panels, out, scale, shift, residual, relu):
    a2 = a.reshape(-1, k)
    res = EMPTY.reshape(0, 1) if residual is None else residual
    items = G.work_items(a2.shape[0], out.shape[1], k, pool.n_threads)

    def tile(b0, b1, p0, p1):
        G.gemm_tile_range(a2, panels, out, b0, b1, p0, p1, scale, shift, res, relu)

    pool.run(tile, items)


def _fused_tail(pool, t2, c3, xs, ds, out, shift):
    a = t2.reshape(-1, c3.w.shape[0])
    a2 = xs.reshape(-1, ds.w.shape[0])
    items = G.work_items(a.shape[0], out.shape[1], a.shape[1] + a2.shape[1], pool.n_threads)

    def tile(b0, b1, p0, p1):
        FU.gemm2_tile_range(a, c3.panels, a2, ds.panels, out, b0, b1, p0, p1, shift, True)

    pool.run(tile, items)


def _epilogue(out, scale, shift, residual, relu):
    res = EMPTY.reshape(0, 1) if residual is None else residual
    K.epilogue(out, scale, shift, res, relu)


def _maxpool(pool, src, shape4, out, items):
    x = _as4(src, shape4)
    pool.run(lambda r0, r1: K.maxpool_nhwc(x, 3, 2, 1, out, r0, r1), items)


def _packed_conv(pool, src, shape4, conv, out_hw, out, residual, relu):
    x = _as4(src, shape4)
    res = EMPTY.reshape(0, 1) if residual is None else residual
    k = conv.w.shape[0]
    items = G.conv_work_items(out.shape[0], out.shape[1], k, pool.n_threads)

    def tile(b0, b1, p0, p1):
        G.conv_tile_range(x, conv.k, conv.stride, conv.pad, out_hw[0], out_hw[1], conv.panels,
                          out, b0, b1, p0, p1, conv.scale, conv.shift, res, relu)  # fmt: skip

    pool.run(tile, items)


def _direct_conv(pool, src, shape4, conv, xp, out_hw, out, relu):
    DC.pad_input(_as4(src, shape4), conv.pad, xp)  # the border of xp stays zero
    ho, wo = out_hw
    panels = out.shape[1] // G.NR

    def rows(r0, r1):
        DC.direct_conv_range(xp, conv.k, conv.stride, ho, wo, conv.panels, out, r0, r1, 0, panels,
                             conv.scale, conv.shift, relu)  # fmt: skip

    pool.run(rows, DC.work_items(shape4[0] * ho, pool.n_threads))


def _winograd_conv(pool, src, shape4, conv, out, relu):
    x = _as4(src, shape4)
    up = conv.winograd_panels()
    th, tw = WG.tile_grid(shape4[1], shape4[2])
    items = WG.work_items(shape4[0] * th * tw, shape4[3], conv.c_out, pool.n_threads)

    def tile(t0, t1, p0, p1):
        WG.winograd_tile_range(x, up, out, t0, t1, p0, p1, conv.scale, conv.shift, relu)

    pool.run(tile, items)


def _avgpool(feat, shape3, pooled):
    np.mean(feat.reshape(shape3), axis=1, out=pooled)
