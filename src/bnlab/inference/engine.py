"""A compiled NHWC inference engine for bottleneck ResNets (ResNet-50 and deeper), CPU, float32.

What "compiled" means here, done once in :func:`compile_resnet`:

* every BN is folded into its conv (:func:`bnlab.fold.fold_conv_bn`, float64 then float32), or,
  with ``fold_bn=False``, kept as a per-channel (scale, shift) applied in the epilogue;
* every conv weight (C_out, C_in, kh, kw) is packed once as a contiguous GEMM operand
  (kh·kw·C_in, C_out) whose row order (i, j, c) matches the im2col columns, and into the 32-column
  panels of bnlab's GEMM (:mod:`bnlab.inference._gemm`);
* activations live as NHWC matrices (N·H·W, C): a 1x1 conv is one GEMM; a 3x3/7x7 conv is an
  implicit GEMM (im2col rows gathered per L2-sized chunk) — or, with ``gemm="blas"`` (the
  reference path), a numba im2col followed by ``np.matmul``;
* bias (or BN scale + shift), the residual add and ReLU are applied to each output tile while it is
  in cache (``gemm="blas"``: one in-place pass after each GEMM);
* buffers are allocated once per input shape and reused between layers and between calls;
* the GEMM items of each layer are shared by a small work-claiming thread pool.

Per bottleneck (v1.5, stride s on the 3x3):

    t1 = relu(X @ W1 + b1)                              (N·H·W, w)
    t2 = relu(im2col3x3,s(t1) @ W2 + b2)                (N·H'·W', w)
    Y  = relu(t2 @ W3 + b3 + identity)                  (N·H'·W', 4w)
    identity = X, or subsample_s(X) @ Wd + bd           (the downsample branch)

``predict`` is not re-entrant (the buffers are shared); a lock serializes concurrent calls.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from bnlab.errors import DTypeError, ShapeError
from bnlab.fold.weights import bn_scale_shift, fold_conv_bn
from bnlab.inference import _gemm as G
from bnlab.inference import _kernels as K
from bnlab.inference import _winograd as WG
from bnlab.inference.spec import (
    ConvSpec,
    ResNetSpec,
    check_state_dict,
    spec_for,
    to_numpy_state_dict,
)

EMPTY = np.zeros(0, np.float32)
DEFAULT_EPS = 1e-5


@dataclass
class PackedConv:
    """A conv ready for GEMM: ``y = epilogue(im2col(x) @ w)``, epilogue y·scale + shift."""

    name: str
    w: np.ndarray  # (k·k·C_in, C_out) float32, contiguous
    shift: np.ndarray  # (C_out,) float32
    scale: np.ndarray  # (C_out,) float32, or empty when BN is folded into w
    k: int
    stride: int
    pad: int
    panels: np.ndarray | None = None  # w as (C_out/32, k·k·C_in, 32) for the packed GEMM
    wino: np.ndarray | None = None  # Winograd U panels (36, C_out/32, C_in, 32), made on demand

    @property
    def c_out(self) -> int:
        return self.w.shape[1]

    def winograd_panels(self) -> np.ndarray:
        """The F(4x4, 3x3) filter transform of the (folded, float32) weight, packed once."""
        if self.wino is None:
            c_in = self.w.shape[0] // 9
            w4 = self.w.reshape(3, 3, c_in, self.c_out).transpose(3, 2, 0, 1)  # (C_out, C_in, 3, 3)
            self.wino = WG.pack_filter(w4)
        return self.wino

    def out_hw(self, h: int, w: int) -> tuple[int, int]:
        return (h + 2 * self.pad - self.k) // self.stride + 1, (w + 2 * self.pad - self.k) // (
            self.stride
        ) + 1


def pack_weight(w: np.ndarray) -> np.ndarray:
    """(C_out, C_in, kh, kw) -> (kh·kw·C_in, C_out), rows ordered (i, j, c) like im2col."""
    c_out = w.shape[0]
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0).reshape(-1, c_out), dtype=np.float32)


def pack_conv(sd: dict, cv: ConvSpec, fold_bn: bool, eps: float) -> PackedConv:
    """Fold (or not) the BN of one conv, then pack. Accepts an already folded conv (bias, no BN)."""
    w = sd[f"{cv.conv}.weight"]
    b = sd.get(f"{cv.conv}.bias")
    scale = EMPTY
    if f"{cv.bn}.running_mean" in sd:
        bn = [sd[f"{cv.bn}.{p}"] for p in ("running_mean", "running_var", "weight", "bias")]
        if fold_bn:
            w, b = fold_conv_bn(w.astype(np.float64), b, bn[0], bn[1], eps, bn[2], bn[3])
        else:
            s, t = bn_scale_shift(bn[2], bn[3], bn[0], bn[1], eps)
            b0 = np.zeros(w.shape[0]) if b is None else b.astype(np.float64)
            scale, b = s.astype(np.float32), b0 * s + t  # BN(conv + b0) = conv·s + (b0·s + t)
    shift = np.zeros(w.shape[0], np.float32) if b is None else np.asarray(b, np.float32)
    packed = pack_weight(w)
    panels = G.pack_panels(packed) if packed.shape[1] % G.NR == 0 else None
    return PackedConv(cv.conv, packed, shift, scale, cv.k, cv.stride, cv.pad, panels)


@dataclass
class PackedBlock:
    conv1: PackedConv
    conv2: PackedConv
    conv3: PackedConv
    downsample: PackedConv | None


@dataclass
class _Plan:
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


class CompiledResNet:
    """``predict(x)`` for a bottleneck ResNet; build it with :func:`bnlab.inference.compile`."""

    def __init__(self, spec: ResNetSpec, stem, blocks, fc_w, fc_b, fold_bn: bool,
                 batch_chunk: int | None = None, gemm: str = "packed",
                 threads: int | None = None, winograd: bool = True):  # fmt: skip
        self.spec = spec
        self.stem: PackedConv = stem
        self.blocks: list[PackedBlock] = blocks
        self.fc_w = fc_w  # (C_feat, classes)
        self.fc_b = fc_b
        self.fold_bn = fold_bn
        self.batch_chunk = batch_chunk  # run big batches this many images at a time (cache reuse)
        self.gemm = gemm  # "packed": the AVX-512 GEMM of _gemm.py; "blas": np.matmul + epilogue
        self.pool = G.shared_pool(threads or G.default_threads())
        self.winograd = winograd  # 3x3 stride-1 convs through Winograd F(4x4, 3x3) (packed only)
        n_pad = -(-fc_w.shape[1] // G.NR) * G.NR  # the fc on the packed GEMM: pad the classes
        self.fc = PackedConv(
            "fc",
            fc_w,
            fc_b,
            EMPTY,
            1,
            1,
            0,
            G.pack_panels(np.pad(fc_w, ((0, 0), (0, n_pad - fc_w.shape[1])))),
        )
        self.fc_shift_padded = np.pad(fc_b, (0, n_pad - fc_b.shape[0]))  # fmt: skip
        self._plans: dict[tuple[int, int, int], _Plan] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ public

    def __call__(self, x: np.ndarray, layout: str = "NCHW") -> np.ndarray:
        return self.predict(x, layout)

    def predict(self, x: np.ndarray, layout: str = "NCHW") -> np.ndarray:
        """Logits (N, classes) float32 of images x (N, 3, H, W), or (N, H, W, 3) for NHWC."""
        x = _check_images(x, layout)
        step = self.batch_chunk or x.shape[0]
        if step >= x.shape[0]:
            return self._predict(x, layout)
        return np.concatenate([self._predict(x[i : i + step], layout)
                               for i in range(0, x.shape[0], step)])  # fmt: skip

    def _predict(self, x: np.ndarray, layout: str) -> np.ndarray:
        n, h, w = (x.shape[0], x.shape[2], x.shape[3]) if layout == "NCHW" else x.shape[:3]
        with self._lock:
            plan = self._plans.get((n, h, w)) or self._build_plan(n, h, w)
            if layout == "NCHW":
                K.nchw_to_nhwc(x, plan.x_nhwc)
            else:
                np.copyto(plan.x_nhwc, x)
            for step in plan.steps:
                step()
            return plan.logits[0][:, : self.fc_w.shape[1]].copy()

    def profile(self, x: np.ndarray, repeats: int = 5, layout: str = "NCHW") -> dict[str, float]:
        """Milliseconds per step kind ('packed_gemm 1x1', 'winograd_conv 3x3', ...), each step
        timed alone, summed over the network, median over ``repeats`` calls (for the benchmark)."""
        import time  # noqa: PLC0415

        x = _check_images(x, layout)
        self._predict(x, layout)  # build the plan, fill the input buffer
        n, h, w = (x.shape[0], x.shape[2], x.shape[3]) if layout == "NCHW" else x.shape[:3]
        plan = self._plans[(n, h, w)]
        times = np.zeros((repeats, len(plan.steps)))
        with self._lock:
            for r in range(repeats):
                for i, step in enumerate(plan.steps):
                    t0 = time.perf_counter()
                    step()
                    times[r, i] = time.perf_counter() - t0
        med = np.median(times, axis=0) * 1e3
        out: dict[str, float] = {}
        for label, ms in zip(plan.labels, med, strict=True):
            out[label] = out.get(label, 0.0) + float(ms)
        return out

    # ------------------------------------------------------------------ planning

    def _build_plan(self, n: int, h0: int, w0: int) -> _Plan:
        arena = _Arena()
        x_slot = arena.request("input", (n, h0, w0, 3))
        steps: list = []
        cur, (h, w) = self._plan_stem(arena, steps, x_slot, n, h0, w0)
        for i, blk in enumerate(self.blocks):  # block outputs alternate between two buffers
            cur, (h, w) = self._plan_block(arena, steps, blk, cur, n, h, w, "a" if i % 2 else "b")
        logits = self._plan_head(arena, steps, cur, n, h, w)
        arena.materialize()
        plan = _Plan(x_slot[0], [_bind(s) for s in steps], logits, [_label(s) for s in steps])
        self._plans[(n, h0, w0)] = plan
        return plan

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
        elif self.gemm == "packed" and conv.panels is not None:  # implicit GEMM: no im2col
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

    def _use_winograd(self, conv: PackedConv, n, h, w, residual) -> bool:
        """Winograd for 3x3 stride-1 convs with enough tiles to reuse the 4x larger transformed
        weights (measured: ResNet's 7x7 maps at batch 1, 4 tiles, are faster direct)."""
        if not (self.winograd and self.gemm == "packed" and conv.panels is not None):
            return False
        if (conv.k, conv.stride, conv.pad) != (3, 1, 1) or residual is not None:
            return False
        th, tw = WG.tile_grid(h, w)
        return n * th * tw >= WG.MIN_TILES

    def _plan_gemm(self, steps, a, conv: PackedConv, shift, out, residual, relu) -> None:
        """out = epilogue(a @ W): one fused parallel step (packed), or np.matmul + a pass."""
        k = conv.w.shape[0]
        if self.gemm == "packed" and conv.panels is not None:
            steps.append((_packed_gemm, self.pool, a, k, conv.panels, out, conv.scale, shift,
                          residual, relu))  # fmt: skip
        else:
            steps.append((_gemm, a, k, conv.w, out))
            steps.append((_epilogue, out, conv.scale, shift, residual, relu))

    def _plan_stem(self, arena, steps, x_slot, n, h, w):
        out, (h, w) = self._plan_conv(arena, steps, self.stem, x_slot, n, h, w, "stem")
        ho, wo = (h + 2 - 3) // 2 + 1, (w + 2 - 3) // 2 + 1
        pooled = arena.request("a", (n, ho, wo, self.stem.c_out))
        steps.append((_maxpool, out, (n, h, w, self.stem.c_out), pooled))
        return pooled, (ho, wo)

    def _plan_block(self, arena, steps, blk: PackedBlock, x, n, h, w, out_role):
        t1, _ = self._plan_conv(arena, steps, blk.conv1, x, n, h, w, "t1")
        t2, (ho, wo) = self._plan_conv(arena, steps, blk.conv2, t1, n, h, w, "t2")
        identity = x
        if blk.downsample is not None:
            identity, _ = self._plan_conv(arena, steps, blk.downsample, x, n, h, w, "ds",
                                          relu=False)  # fmt: skip
        y, _ = self._plan_conv(arena, steps, blk.conv3, t2, n, ho, wo, out_role, residual=identity)
        return y, (ho, wo)

    def _plan_head(self, arena, steps, feat, n, h, w):
        c = self.fc_w.shape[0]
        pooled = arena.request("pooled", (n, c))
        steps.append((_avgpool, feat, (n, h * w, c), pooled))
        if self.gemm == "packed":
            logits = arena.request("logits", (n, self.fc.panels.shape[0] * G.NR))
            self._plan_gemm(steps, pooled, self.fc, self.fc_shift_padded, logits, None, False)
        else:
            logits = arena.request("logits", (n, self.fc_w.shape[1]))
            self._plan_gemm(steps, pooled, self.fc, self.fc_b, logits, None, False)
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


def _epilogue(out, scale, shift, residual, relu):
    res = EMPTY.reshape(0, 1) if residual is None else residual
    K.epilogue(out, scale, shift, res, relu)


def _maxpool(src, shape4, out):
    K.maxpool_nhwc(_as4(src, shape4), 3, 2, 1, out)


def _packed_conv(pool, src, shape4, conv, out_hw, out, residual, relu):
    x = _as4(src, shape4)
    res = EMPTY.reshape(0, 1) if residual is None else residual
    k = conv.w.shape[0]
    items = G.work_items(out.shape[0], out.shape[1], k, pool.n_threads)

    def tile(b0, b1, p0, p1):
        G.conv_tile_range(x, conv.k, conv.stride, conv.pad, out_hw[0], out_hw[1], conv.panels,
                          out, b0, b1, p0, p1, conv.scale, conv.shift, res, relu)  # fmt: skip

    pool.run(tile, items)


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


# --------------------------------------------------------------------------- input, building


def _check_images(x, layout: str) -> np.ndarray:
    if layout not in ("NCHW", "NHWC"):
        raise ValueError(f"layout must be 'NCHW' or 'NHWC', got {layout!r}")
    if not isinstance(x, np.ndarray):
        raise TypeError(f"x must be a NumPy array of images, got {type(x).__name__}")
    if not np.issubdtype(x.dtype, np.floating):
        raise DTypeError(f"x must be float32 images (scaled and normalized), got dtype {x.dtype}")
    want = "(N, 3, H, W)" if layout == "NCHW" else "(N, H, W, 3)"
    if x.ndim != 4:
        raise ShapeError(f"x must be a batch of images {want} ({layout}), got shape {x.shape}")
    c = x.shape[1] if layout == "NCHW" else x.shape[3]
    if c != 3:
        raise ShapeError(f"x must have 3 color channels, shape {want} ({layout}), got {x.shape}")
    if x.shape[0] == 0 or min(x.shape) == 0:
        raise ShapeError(f"x must not be empty, got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def compile_resnet(model_or_state_dict, fold_bn: bool = True, eps: float = DEFAULT_EPS,
                   batch_chunk: int | None = None, gemm: str = "packed",
                   threads: int | None = None, winograd: bool = True):  # fmt: skip
    """Validate a bottleneck-ResNet state dict (or model) and pack it into a CompiledResNet."""
    sd = to_numpy_state_dict(model_or_state_dict)
    spec = spec_for(sd)
    check_state_dict(sd, spec)
    eps = _model_eps(model_or_state_dict, eps)

    def pack(cv):
        return pack_conv(sd, cv, fold_bn, eps)

    blocks = [
        PackedBlock(
            pack(b.conv1),
            pack(b.conv2),
            pack(b.conv3),
            pack(b.downsample) if b.downsample else None,
        )  # fmt: skip
        for b in spec.blocks
    ]
    fc_w = np.ascontiguousarray(sd["fc.weight"].T, dtype=np.float32)
    fc_b = np.asarray(sd["fc.bias"], np.float32).copy()
    return CompiledResNet(spec, pack(spec.stem), blocks, fc_w, fc_b, fold_bn, batch_chunk, gemm,
                          threads, winograd)  # fmt: skip


def _model_eps(model, default: float) -> float:
    """The BN eps of a model (all its BNs must agree); a bare state dict uses ``default``."""
    if not hasattr(model, "modules") or not callable(model.modules):
        return default
    eps = {float(m.eps) for m in model.modules() if hasattr(m, "running_var") and hasattr(m, "eps")}
    if len(eps) > 1:
        raise ValueError(f"the model's BN layers use different eps values {sorted(eps)}")
    return eps.pop() if eps else default
