"""A compiled NHWC inference engine for bottleneck ResNets (ResNet-50 and deeper), CPU, float32.

What "compiled" means here, done once in :func:`compile_resnet`:

* every BN is folded into its conv (:func:`bnlab.fold.fold_conv_bn`, float64 then float32), or,
  with ``fold_bn=False``, kept as a per-channel (scale, shift) applied in the epilogue;
* every conv weight (C_out, C_in, kh, kw) is packed once as a contiguous GEMM operand
  (kh·kw·C_in, C_out) whose row order (i, j, c) matches the im2col columns, and into the 32-column
  panels of bnlab's GEMM (:mod:`bnlab.inference._gemm`);
* activations live as NHWC matrices (N·H·W, C): a 1x1 conv is one GEMM; a 3x3 stride-1 conv
  is Winograd F(4x4, 3x3) (:mod:`._winograd`) when the map has enough tiles; the stem (3 input
  channels) a direct conv on a padded input (:mod:`._direct`); other k x k convs an implicit
  GEMM (im2col rows gathered per L2-sized chunk); with ``gemm="blas"`` (the reference path), a
  numba im2col followed by ``np.matmul``;
* bias (or BN scale + shift), the residual add and ReLU are applied to each output tile while it is
  in cache (``gemm="blas"``: one in-place pass after each GEMM);
* buffers are allocated once per input shape and reused between layers and between calls;
* the GEMM items of each layer are shared by a small work-claiming thread pool; a batch that
  divides evenly among the threads is instead split into one lane per thread, each lane running
  the whole network on its share of the images (no synchronization between layers).

The plan (steps and buffers) is built by :mod:`bnlab.inference._plan`; the packed layers are in
:mod:`bnlab.inference._packing`, the kernels in ``_gemm``, ``_winograd``, ``_direct``,
``_fused`` and ``_kernels``.

Per bottleneck (v1.5, stride s on the 3x3):

    t1 = relu(X @ W1 + b1)                              (N·H·W, w)
    t2 = relu(im2col3x3,s(t1) @ W2 + b2)                (N·H'·W', w)
    Y  = relu(t2 @ W3 + b3 + identity)                  (N·H'·W', 4w)
    identity = X, or subsample_s(X) @ Wd + bd           (the downsample branch)

With folded BN a downsample block's last two products run as one GEMM with two K segments
(:mod:`._fused`): Y = relu(t2 @ W3 + subsample_s(X) @ Wd + b3 + bd).

``predict`` is not re-entrant (the buffers are shared); a lock serializes concurrent calls.
"""

from __future__ import annotations

import threading

import numpy as np

from bnlab.errors import DTypeError, ShapeError
from bnlab.inference import _gemm as G
from bnlab.inference import _kernels as K
from bnlab.inference._packing import EMPTY, PackedBlock, PackedConv, pack_conv, pack_weight
from bnlab.inference._plan import Plan, Planner
from bnlab.inference.spec import ResNetSpec, check_state_dict, spec_for, to_numpy_state_dict

__all__ = ["CompiledResNet", "PackedBlock", "PackedConv", "compile_resnet", "pack_weight"]

DEFAULT_EPS = 1e-5


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
        self._plans: dict[tuple[int, int, int, int], Plan] = {}  # (lane, N, H, W) -> plan
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
        lanes = self._lanes(x.shape[0])
        with self._lock:
            if lanes == 1:
                return self._run(x, layout, 0, self.pool)
            part = x.shape[0] // lanes
            out = np.empty((x.shape[0], self.fc_w.shape[1]), np.float32)

            def lane(i):
                out[i * part : (i + 1) * part] = self._run(x[i * part : (i + 1) * part], layout,
                                                           i + 1, SERIAL)  # fmt: skip

            self.pool.run(lane, [(i,) for i in range(lanes)])
            return out

    def _lanes(self, n: int) -> int:
        """Lanes a batch of n is split into: one per thread when n divides evenly (each lane runs
        every layer on n/threads images, one thread, no barrier per layer), else 1 (every layer's
        work items shared by the pool)."""
        t = self.pool.n_threads
        return t if self.gemm == "packed" and t > 1 and n % t == 0 else 1

    def _run(self, x: np.ndarray, layout: str, lane: int, pool: G.WorkPool) -> np.ndarray:
        """Logits of x through the plan of (lane, shape), built on first use on ``pool``."""
        plan = self._plan(x, layout, lane, pool)
        if layout == "NCHW":
            K.nchw_to_nhwc(x, plan.x_nhwc)
        else:
            np.copyto(plan.x_nhwc, x)
        for step in plan.steps:
            step()
        return plan.logits[0][:, : self.fc_w.shape[1]].copy()

    def _plan(self, x: np.ndarray, layout: str, lane: int, pool: G.WorkPool) -> Plan:
        n, h, w = (x.shape[0], x.shape[2], x.shape[3]) if layout == "NCHW" else x.shape[:3]
        key = (lane, n, h, w)
        if key not in self._plans:
            self._plans[key] = Planner(self, pool).build(n, h, w)
        return self._plans[key]

    def profile(self, x: np.ndarray, repeats: int = 5, layout: str = "NCHW") -> dict[str, float]:
        """Milliseconds per step kind ('packed_gemm', 'winograd_conv 3x3', ...), each step timed
        alone, summed over the network, median over ``repeats`` calls. The batch runs as one lane
        (every layer shared by the pool), so this is the per-layer view, not the lane split."""
        import time  # noqa: PLC0415

        x = _check_images(x, layout)
        with self._lock:
            self._run(x, layout, 0, self.pool)  # build the plan, fill the input buffer
            plan = self._plan(x, layout, 0, self.pool)
            times = np.zeros((repeats, len(plan.steps)))
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


SERIAL = G.shared_pool(1)  # the pool of a lane: runs every item on the calling thread


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
