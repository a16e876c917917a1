"""The compiled NHWC inference engine: a folded, fused graph on packed kernels, CPU, float32.

What "compiled" means here, done once by :func:`bnlab.inference.compile`:

* every BN after a conv or linear layer is folded into it (:mod:`bnlab.inference.passes`, the
  fold itself :func:`bnlab.fold.fold_conv_bn`, float64 then float32); a BN that cannot be folded
  (after an add, say) runs as a per-channel affine step;
* activations (ReLU, ReLU6, SiLU, Hardswish, Hardsigmoid, Sigmoid) and residual adds become the
  epilogue of the conv that produces their input;
* every conv and linear weight is packed once for its kernel (:mod:`._packing`).

Per input shape a plan is made (:mod:`._plan`): which kernel runs each conv (1x1: a GEMM on the
NHWC matrix; 3x3 stride 1: Winograd when the map has enough tiles; few input channels: a direct
conv; depthwise and grouped with 2-16 channels per group: the strip kernels of :mod:`._strips`;
others: an implicit GEMM), and buffers allocated once and reused between layers and calls.

Threads: the items of each step are shared by a small work-claiming pool (:mod:`._pool`); a
batch that divides evenly among the threads is instead split into one lane per thread, each lane
running the whole network on its share of the images (no synchronization between layers).

``predict`` is not re-entrant (the buffers are shared); a lock serializes concurrent calls.
"""

from __future__ import annotations

import threading

import numpy as np

from bnlab.errors import DTypeError, NonFiniteError, ShapeError
from bnlab.inference import _kernels as K
from bnlab.inference import _pool
from bnlab.inference._arena import Plan
from bnlab.inference._packing import pack_conv, pack_linear
from bnlab.inference._plan import Planner
from bnlab.inference.graph import Graph

__all__ = ["CompiledNet"]


class CompiledNet:
    """``predict(x)`` of a compiled network; build it with :func:`bnlab.inference.compile`.

    Attributes: ``graph`` (the folded and fused graph the engine runs), ``in_channels``,
    ``certificate`` (the fold's :class:`~bnlab.fold.FoldCertificate` when compiled with a
    calibration batch, else None), ``folded_pairs`` (the (layer, BN) names that were folded).
    """

    def __init__(
        self,
        graph: Graph,
        *,
        threads: int | None = None,
        batch_chunk: int | None = None,
        winograd: bool = True,
        certificate=None,
        folded_pairs=(),
    ):
        self.graph = graph
        self.in_channels = graph.in_channels
        self.packed = {}
        for nd in graph.nodes:
            if nd.op == "conv":
                self.packed[nd.name] = pack_conv(nd)
            elif nd.op == "linear":
                self.packed[nd.name] = pack_linear(nd)
        self.pool = _pool.shared_pool(threads or _pool.default_threads())
        self.batch_chunk = batch_chunk  # run big batches this many images at a time
        self.winograd = winograd  # 3x3 stride-1 convs through Winograd F(4x4, 3x3)
        self.certificate = certificate
        self.folded_pairs = list(folded_pairs)
        self._plans: dict[tuple[int, int, int, int], Plan] = {}  # (lane, N, H, W) -> plan
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ public

    def __call__(self, x: np.ndarray, layout: str = "NCHW") -> np.ndarray:
        return self.predict(x, layout)

    def predict(self, x: np.ndarray, layout: str = "NCHW") -> np.ndarray:
        """The network's output (N, classes) float32 (or (N, C, H, W) for a map) of images x
        (N, C, H, W), or (N, H, W, C) with ``layout="NHWC"``."""
        x = check_images(x, layout, self.in_channels)
        step = self.batch_chunk or x.shape[0]
        if step >= x.shape[0]:
            return self._predict(x, layout)
        return np.concatenate(
            [self._predict(x[i : i + step], layout) for i in range(0, x.shape[0], step)]
        )

    def profile(self, x: np.ndarray, repeats: int = 5, layout: str = "NCHW") -> dict[str, float]:
        """Milliseconds per step kind ('packed_gemm', 'winograd_conv 3x3', ...), each step timed
        alone, summed over the network, median over ``repeats`` calls. The batch runs as one lane
        (every layer shared by the pool): the per-layer view, not the lane split."""
        import time  # noqa: PLC0415

        x = check_images(x, layout, self.in_channels)
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

    # ------------------------------------------------------------------ running

    def _predict(self, x: np.ndarray, layout: str) -> np.ndarray:
        lanes = self._lanes(x.shape[0])
        with self._lock:
            if lanes == 1:
                return self._run(x, layout, 0, self.pool)
            part = x.shape[0] // lanes
            outs: list = [None] * lanes

            def lane(i):
                outs[i] = self._run(x[i * part : (i + 1) * part], layout, i + 1, SERIAL)

            self.pool.run(lane, [(i,) for i in range(lanes)])
            return np.concatenate(outs)

    def _lanes(self, n: int) -> int:
        """Lanes a batch of n is split into: one per thread when n divides evenly (each lane runs
        every layer on n/threads images, one thread, no barrier per layer), else 1 (every layer's
        work items shared by the pool)."""
        t = self.pool.n_threads
        return t if t > 1 and n % t == 0 else 1

    def _run(self, x: np.ndarray, layout: str, lane: int, pool) -> np.ndarray:
        """The output for x through the plan of (lane, shape), built on first use on ``pool``."""
        plan = self._plan(x, layout, lane, pool)
        if layout == "NCHW":
            K.nchw_to_nhwc(x, plan.x_nhwc)
        else:
            np.copyto(plan.x_nhwc, x)
        for step in plan.steps:
            step()
        out = plan.output
        if out.ndim == 4:  # a map: back to NCHW
            res = np.empty((out.shape[0], out.shape[3], out.shape[1], out.shape[2]), np.float32)
            K.nhwc_to_nchw(out, res)
            return res
        return out.copy()

    def _plan(self, x: np.ndarray, layout: str, lane: int, pool) -> Plan:
        n, h, w = (x.shape[0], x.shape[2], x.shape[3]) if layout == "NCHW" else x.shape[:3]
        key = (lane, n, h, w)
        if key not in self._plans:
            self._plans[key] = Planner(self, pool).build(n, h, w)
        return self._plans[key]


SERIAL = _pool.shared_pool(1)  # the pool of a lane: runs every item on the calling thread


def check_images(x, layout: str, channels: int) -> np.ndarray:
    """x as a contiguous float32 batch, or a clear error (wrong type, dtype, shape, NaN/Inf)."""
    if layout not in ("NCHW", "NHWC"):
        raise ValueError(f"layout must be 'NCHW' or 'NHWC', got {layout!r}")
    if not isinstance(x, np.ndarray):
        raise TypeError(f"x must be a NumPy array of images, got {type(x).__name__}")
    if not np.issubdtype(x.dtype, np.floating):
        raise DTypeError(f"x must be float32 images (scaled and normalized), got dtype {x.dtype}")
    want = f"(N, {channels}, H, W)" if layout == "NCHW" else f"(N, H, W, {channels})"
    if x.ndim != 4:
        raise ShapeError(f"x must be a batch of images {want} ({layout}), got shape {x.shape}")
    c = x.shape[1] if layout == "NCHW" else x.shape[3]
    if c != channels:
        raise ShapeError(
            f"x must have {channels} color channels, shape {want} ({layout}), got {x.shape}"
        )
    if x.shape[0] == 0 or min(x.shape) == 0:
        raise ShapeError(f"x must not be empty, got shape {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not K.all_finite(x.reshape(-1)):
        raise NonFiniteError("x contains NaN or Inf: the network's output would be meaningless")
    return x
