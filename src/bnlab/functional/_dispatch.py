"""The one seam between the NumPy reference (:mod:`bnlab.functional`) and the kernels.

The reference modules hold the math; everything else a call needs lives here, once:

* **backend choice** (:func:`choose`): ``backend="numba"`` (or :func:`bnlab.set_backend`) runs
  the kernels, ``"numpy"`` the reference; the default runs the kernels only from
  :data:`BREAK_EVEN` values of x on (below that their fixed costs exceed the work, and a call
  that runs the reference never imports numba);
* **staging** (:func:`compute_array`): the kernels read native float32/float64 C-contiguous
  aligned arrays; float16 is computed in float32, byte-swapped, strided or misaligned input
  through a private copy;
* **outputs and aliasing**: an ``out=``/``dx=`` that shares memory with an input gets exactly the
  values it would get without sharing (the kernels write a private buffer, copied in after); an
  output that cannot be written directly (float16, byte-swapped, strided) is filled the same way;
  outputs the caller does not give come from :mod:`bnlab.buffers` (reused memory);
* **the input kept for the backward**: a forward keeps x by reference, plus a
  :class:`Fingerprint` of a few dozen of its values that the backward compares exactly, so a
  modified x is an :class:`~bnlab.errors.InputModifiedError`, never wrong gradients; a private
  copy (staged input, or an ``out=`` that overlaps x) needs no fingerprint.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import numpy as np

from bnlab.backend import requested_backend
from bnlab.errors import InputModifiedError
from bnlab.functional.stats import accumulation_dtype

# --------------------------------------------------------------------------- backend choice

#: Values of x from which the default backend runs the kernels, per norm and mode, measured by
#: ``benchmarks/bench_small.py`` (docs/kernels.md): inference, where the reference is one
#: multiply-add, from where the kernels are faster; training, from where they are clearly faster
#: (below it they gain at most ~15 µs a call, and the reference never imports numba: ~0.2 s of
#: the first call of a process).
BREAK_EVEN = {
    ("batch_norm", "train"): 4096,
    ("batch_norm", "eval"): 1 << 18,
    ("layer_norm", "train"): 4096,
    ("group_norm", "train"): 4096,
}


@dataclass(frozen=True)
class Choice:
    backend: str  # "numpy" or "numba"
    reason: str


def choose(backend: str | None, norm: str, mode: str, size: int) -> Choice:
    """Which backend a call runs, and why. ``mode``: "train" or "eval"."""
    name, explicit = requested_backend(backend)
    if size == 0:
        return Choice("numpy", "empty input: nothing to compute")
    if name == "numpy":
        return Choice("numpy", "backend 'numpy' " + ("requested" if explicit else "(default)"))
    if explicit:
        return Choice("numba", "backend 'numba' requested")
    limit = BREAK_EVEN[(norm, mode)]
    if size < limit:
        return Choice("numpy", f"{size} values < {limit}: the NumPy reference is faster here")
    return Choice("numba", f"{size} values >= {limit}: the kernels are faster here")


# --------------------------------------------------------------------------- staging


def compute_array(a: np.ndarray) -> tuple[np.ndarray, bool]:
    """(the array the kernels read, whether it is a private copy): native float32/float64,
    C-contiguous and aligned. float16 is computed in float32 (numba has no float16 arithmetic)."""
    dt = a.dtype
    if dt.type is np.float16:
        return np.ascontiguousarray(a, np.float32), True
    if not dt.isnative:
        return np.ascontiguousarray(a.astype(dt.newbyteorder("="))), True
    if not (a.flags.c_contiguous and a.flags.aligned):
        return np.array(a, order="C"), True
    return a, False


def like_compute(a: np.ndarray, dtype) -> np.ndarray:
    """``a`` (a second input, e.g. dy) in the compute dtype of x, native, C-contiguous, aligned."""
    if a.dtype == dtype and a.flags.c_contiguous and a.flags.aligned:
        return a
    return np.array(a, dtype=dtype, order="C")


def overlaps(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether a and b may share memory: the cheap bounds test, then the exact one where it is
    cheap (an inconclusive exact test counts as sharing)."""
    if not np.may_share_memory(a, b):
        return False
    try:
        return bool(np.shares_memory(a, b, max_work=10_000))
    except np.exceptions.TooHardError:
        return True


def kept_input(x: np.ndarray, out: np.ndarray | None):
    """(x as the cache keeps it, its fingerprint): x itself, or a private copy when the forward's
    ``out`` overlaps it (the forward is about to overwrite it)."""
    if out is not None and overlaps(out, x):
        return x.copy(), None
    return x, Fingerprint.of(x)


def deliver(out: np.ndarray | None, y: np.ndarray, dtype) -> np.ndarray:
    """The reference's result in x's dtype, written into ``out`` when given (after the whole
    result is computed, so an ``out`` that shares memory with an input is safe)."""
    if out is None:
        return y.astype(dtype, copy=False)
    np.copyto(out, y, casting="unsafe")
    return out


# --------------------------------------------------------------------------- fingerprint

_RUNS, _RUN = 6, 8  # 6 runs of 8 consecutive values: 48 values, in at most 12 cache lines
_SAMPLES = _RUNS * _RUN
_rotation = itertools.count(1)


@functools.lru_cache(maxsize=256)
def _base_positions(size: int) -> np.ndarray:
    """_SAMPLES positions in [0, size): _RUNS runs of _RUN consecutive values, one run in each
    of _RUNS equal strides of x at a random place inside it (fixed per size; every fingerprint
    rotates them). Runs keep the gather to a dozen cache lines: on x just evicted from the
    caches, 48 scattered values cost 48 memory round trips."""
    jitter = np.random.default_rng(size).random(_RUNS)
    starts = ((np.arange(_RUNS) + jitter) * ((size - _RUN) / _RUNS)).astype(np.intp)
    return (starts[:, None] + np.arange(_RUN)).reshape(-1)


class Fingerprint:
    """A few dozen values of an array at pseudo-random positions (all of it when it is small),
    to tell, cheaply and exactly, whether it changed."""

    __slots__ = ("positions", "values")

    def __init__(self, positions, values: bytes):
        self.positions, self.values = positions, values

    @classmethod
    def of(cls, x: np.ndarray) -> Fingerprint:
        if x.size <= _SAMPLES:
            return cls(None, x.tobytes())
        offset = next(_rotation) * 0x9E3779B1 % x.size  # a different rotation for every call
        positions = (_base_positions(x.size) + offset) % x.size
        return cls(positions, _gather(x, positions).tobytes())

    def matches(self, x: np.ndarray) -> bool:
        if self.positions is None:
            return x.tobytes() == self.values
        return _gather(x, self.positions).tobytes() == self.values

    def check(self, x: np.ndarray, name: str = "x") -> None:
        if not self.matches(x):
            raise InputModifiedError(
                f"{name} was modified after the forward pass (an in-place operation on it, or "
                f"it was passed as out= of another call): the backward needs the values the "
                f"forward saw. Keep {name} unchanged until the backward, or pass a copy "
                f"({name}.copy()) to the forward."
            )


def _gather(x: np.ndarray, positions: np.ndarray) -> np.ndarray:
    if x.flags.c_contiguous:
        return x.reshape(-1)[positions]
    return x[np.unravel_index(positions, x.shape)]


def check_kept(x: np.ndarray, fingerprint: Fingerprint | None, name: str = "x") -> None:
    """Refuse a backward whose kept input changed since its forward (no-op for private copies)."""
    if fingerprint is not None:
        fingerprint.check(x, name)


# --------------------------------------------------------------------------- kernel outputs


def _threads() -> int:
    import numba

    return numba.get_num_threads()


def _target(out, dtype, shape, avoid, like, stream: bool) -> tuple[np.ndarray, bool]:
    """(the array a kernel writes, whether it must be copied into ``out`` afterwards): the
    caller's ``out`` itself when the kernels can write it (compute dtype, C-contiguous, aligned,
    sharing no memory with an input in ``avoid``), else a buffer from :mod:`bnlab.buffers`
    (aligned like ``like`` when the plan streams)."""
    if out is not None:
        direct = out.dtype == dtype and out.flags.c_contiguous and out.flags.aligned
        if direct and not any(overlaps(out, a) for a in avoid):
            return out, False
    from bnlab.buffers import CACHE

    return CACHE.empty(shape, dtype, like=like if stream else None), out is not None


def _result(target: np.ndarray, copy_into: bool, out, dtype) -> np.ndarray:
    if copy_into:
        np.copyto(out, target, casting="same_kind")
        return out
    if out is not None:
        return out
    return target if target.dtype == dtype else target.astype(dtype)


def _streams(p, target, *inputs) -> bool:
    if not p.stream:
        return False
    from bnlab.kernels._stream import streams

    return streams(target, *inputs)


@dataclass
class KernelRun:
    """A forward through the kernels: the output, the statistics in the accumulation dtype, and
    the input as the backward will read it."""

    y: np.ndarray
    mean: np.ndarray | None
    var: np.ndarray | None
    rstd: np.ndarray | None
    finite: bool
    x: np.ndarray  # the compute array the backward reads (x itself or a private copy)
    fingerprint: Fingerprint | None
    plan: object


def _forward_input(x: np.ndarray, out) -> tuple[np.ndarray, Fingerprint | None]:
    """(compute array, fingerprint): staged inputs and inputs that ``out`` overlaps are private
    copies; others are kept by reference and fingerprinted."""
    xw, private = compute_array(x)
    if not private and out is not None and overlaps(out, x):
        xw, private = x.copy(), True
    return xw, None if private else Fingerprint.of(xw)


# --------------------------------------------------------------------------- batch norm


def bn_plan(shape, layout: str, dtype):
    from bnlab.kernels.paths import plan

    return plan(shape, layout, dtype, _threads())


def bn_train_kernels(x, layout: str, g, b, eps: float, out) -> KernelRun:
    """Training forward of x (in ``layout``) through the kernels; g, b (C,) float64."""
    from bnlab.kernels import batch_norm as k

    xw, fingerprint = _forward_input(x, out)
    p = bn_plan(x.shape, layout, xw.dtype)
    target, copy_into = _target(out, xw.dtype, x.shape, (), xw, p.stream)
    x3, t3 = xw.reshape(p.view), target.reshape(p.view)
    mean64, var64 = k.run_train_forward(x3, g, b, eps, p, _streams(p, t3, x3), t3)
    mean, var, rstd, finite = k.statistics(accumulation_dtype(x.dtype), mean64, var64, eps)
    y = _result(target, copy_into, out, x.dtype)
    return KernelRun(y, mean, var, rstd, finite, xw, fingerprint, p)


def bn_moments_kernels(x, layout: str):
    """Per-channel (mean, biased var) of x in the accumulation dtype, by the kernels'
    statistics pass (batch renorm)."""
    from bnlab.kernels import batch_norm as k

    xw, _ = compute_array(x)
    p = bn_plan(x.shape, layout, xw.dtype)
    mean, var = k.run_moments(xw.reshape(p.view), p)
    acc = accumulation_dtype(x.dtype)
    return mean.astype(acc), var.astype(acc)


def bn_eval_kernels(x, layout: str, scale, shift, out, keep: bool = False):
    """y = x·scale + shift per channel through the kernels (scale, shift (C,) float64). With
    ``keep``, a :class:`KernelRun` (the backward needs x), else y."""
    from bnlab.kernels import batch_norm as k

    if keep:
        xw, fingerprint = _forward_input(x, out)
    else:
        xw, fingerprint = compute_array(x)[0], None
    p = bn_plan(x.shape, layout, xw.dtype)
    target, copy_into = _target(out, xw.dtype, x.shape, (xw,), xw, p.stream)
    x3, t3 = xw.reshape(p.view), target.reshape(p.view)
    k.run_eval_forward(x3, scale, shift, p, _streams(p, t3, x3), t3)
    y = _result(target, copy_into, out, x.dtype)
    return KernelRun(y, None, None, None, True, xw, fingerprint, p) if keep else y


def bn_backward_kernels(dy, x, layout: str, mean, rstd, g, training: bool, dx, dtype=None):
    """(dx, dγ, dβ) through the kernels; x as the forward kept it (or the caller's, for the
    kernel API), mean, rstd, g (C,) float64. dγ, dβ in the accumulation dtype of ``dtype``
    (the forward input's dtype; default x's)."""
    from bnlab.kernels import batch_norm as k

    dtype = x.dtype if dtype is None else np.dtype(dtype)
    xw, _ = compute_array(x)
    dyw = like_compute(dy, xw.dtype)
    p = bn_plan(x.shape, layout, xw.dtype)
    target, copy_into = _target(dx, xw.dtype, x.shape, (dyw, xw), xw, p.stream)
    x3, d3, t3 = xw.reshape(p.view), dyw.reshape(p.view), target.reshape(p.view)
    run = k.run_backward if training else k.run_eval_backward
    dgamma, dbeta = run(d3, x3, mean, rstd, g, p, _streams(p, t3, d3, x3), t3)
    acc = accumulation_dtype(dtype)
    return _result(target, copy_into, dx, dtype), dgamma.astype(acc), dbeta.astype(acc)


# --------------------------------------------------------------------------- layer/group norm


@dataclass
class NormRun:
    y: np.ndarray
    mean: np.ndarray
    rstd: np.ndarray
    x: np.ndarray
    fingerprint: Fingerprint | None


def ln_kernels(x2, g, b, eps: float, out) -> NormRun:
    """Layer norm of the (M, D) view x2 through the kernels; g, b (D,) float64."""
    from bnlab.kernels import layer_norm as k
    from bnlab.kernels.paths import plan

    xw, fingerprint = _forward_input(x2, out)
    p = plan(xw.shape, "NC", xw.dtype, _threads(), "layer_norm")
    target, copy_into = _target(out, xw.dtype, xw.shape, (), xw, p.stream)
    mean, rstd = k.run_forward(xw, g, b, eps, p, _streams(p, target, xw), target)
    acc = accumulation_dtype(x2.dtype)
    y = _result(target, copy_into, out, x2.dtype)
    return NormRun(y, mean.astype(acc), rstd.astype(acc), xw, fingerprint)


def ln_backward_kernels(dy2, x2, mean, rstd, g, dx, dtype=None):
    """(dx, dγ, dβ) of layer norm through the kernels; mean, rstd (M,), g (D,) float64."""
    from bnlab.kernels import layer_norm as k
    from bnlab.kernels.paths import plan

    dtype = x2.dtype if dtype is None else np.dtype(dtype)
    xw, _ = compute_array(x2)
    dyw = like_compute(dy2, xw.dtype)
    p = plan(xw.shape, "NC", xw.dtype, _threads(), "layer_norm")
    target, copy_into = _target(dx, xw.dtype, xw.shape, (dyw, xw), xw, p.stream)
    dgamma, dbeta = k.run_backward(dyw, xw, mean, rstd, g, p, _streams(p, target, dyw, xw), target)
    acc = accumulation_dtype(dtype)
    return _result(target, copy_into, dx, dtype), dgamma.astype(acc), dbeta.astype(acc)


def gn_kernels(x3, groups: int, g, b, eps: float, out) -> NormRun:
    """Group norm of the channels-first (N, C, S) view x3 through the kernels."""
    from bnlab.kernels import group_norm as k
    from bnlab.kernels.paths import plan

    xw, fingerprint = _forward_input(x3, out)
    p = plan(xw.shape, "NCL", xw.dtype, _threads(), "group_norm", num_groups=groups)
    target, copy_into = _target(out, xw.dtype, xw.shape, (), xw, p.stream)
    mean, rstd = k.run_forward(xw, groups, g, b, eps, p, _streams(p, target, xw), target)
    acc = accumulation_dtype(x3.dtype)
    y = _result(target, copy_into, out, x3.dtype)
    return NormRun(y, mean.astype(acc), rstd.astype(acc), xw, fingerprint)


def gn_backward_kernels(dy3, x3, groups: int, mean, rstd, g, dx, dtype=None):
    """(dx, dγ, dβ) of group norm through the kernels; mean, rstd (N, G) float64."""
    from bnlab.kernels import group_norm as k
    from bnlab.kernels.paths import plan

    dtype = x3.dtype if dtype is None else np.dtype(dtype)
    xw, _ = compute_array(x3)
    dyw = like_compute(dy3, xw.dtype)
    p = plan(xw.shape, "NCL", xw.dtype, _threads(), "group_norm", num_groups=groups)
    target, copy_into = _target(dx, xw.dtype, xw.shape, (dyw, xw), xw, p.stream)
    stream = _streams(p, target, dyw, xw)
    dgamma, dbeta = k.run_backward(dyw, xw, groups, mean, rstd, g, p, stream, target)
    acc = accumulation_dtype(dtype)
    return _result(target, copy_into, dx, dtype), dgamma.astype(acc), dbeta.astype(acc)
