"""Batch norm on the kernels: each direction runs the kernels its plan names (:mod:`.plan`).

    training forward   μ, σ² = moments(x);  y = (x − μ)·(γ·rstd) + β,  rstd = 1/√(σ² + ε)
    inference forward  y = x·scale + shift                    (scale = γ·rstd, shift = β − μ·scale)
    training backward  dβ = Σdy,  dγ = rstd·Σdy·(x − μ)
                       dx = A·dy + B·(x − μ) + D,  A = γ·rstd,  B = −A·rstd·dγ/m,  D = −A·Σdy/m
    inference backward dγ, dβ as above;  dx = dy·γ·rstd

``run_*`` take arrays already in the plan's view (native float32/float64, C-contiguous; the seam
:mod:`bnlab.functional._dispatch` stages them) and float64 (C,) vectors; they return float64
statistics / parameter gradients and write the output array they are given.

The public ``bn_*`` functions take 3-D views — (N, C, S) when ``channels_last`` is False (NCHW,
NCL), (N, S, C) when True (NHWC, NLC, NC as (N, 1, C)) — check every argument (the kernels index
raw memory: nothing else may reach them) and go through the same seam as ``bnlab.functional``.
"""

from __future__ import annotations

import numpy as np

from . import _checks
from .paths import LANES, Plan


def _cf():
    from . import bn_cf  # imported on first use: a call loads only the kernels it runs

    return bn_cf


def _cl():
    from . import bn_cl

    return bn_cl


def _cf_fixed(chunks) -> int:
    """Long channels-first rows are summed as rows of LANES lanes in registers, short ones as
    one row of S lanes in memory."""
    return LANES if chunks["registers"] else 0


def _cl_fixed(chunks) -> int:
    return chunks["width"] if chunks["registers"] else 0


def _affine_coefs(dtype, *vectors):
    return [np.ascontiguousarray(v, dtype=dtype) for v in vectors]


def _lane_rows(a, width: int):
    """A channels-last array as (its whole lane rows (R·C // W, W), the leftover (1, t))."""
    flat = a.reshape(-1)
    full = flat.shape[0] // width * width
    return flat[:full].reshape(-1, width), flat[full:].reshape(1, -1)


def _partials(rows: int, c: int, k: int):
    return [np.empty((rows, c)) for _ in range(k)]


# --------------------------------------------------------------------------- statistics


def run_moments(x3, p: Plan):
    """Per-channel (mean, biased var) float64 (C,) of the view x3 (cf_moments / cl_moments)."""
    from ._sums import merge_moments

    ch = p.chunks
    if p.channels_last:
        rows, c = x3.shape
        blocks = ch["blocks"]
        parts = _partials(blocks, c, 3)
        bulk, tail = _lane_rows(x3, ch["width"])
        _cl().two_pass(_cl_fixed(ch))[0](p.parallel, bulk, tail, c, blocks, *parts)
    else:
        c = x3.shape[1]
        parts = _partials(ch["groups"], c, 3)
        moments = _cf().reductions(_cf_fixed(ch))[0]
        args = (ch["lanes"], ch["groups"], ch["channel_blocks"], ch["pieces"])
        moments(p.parallel, x3, *args, *parts)
    mean, var = np.empty(c), np.empty(c)
    merge_moments(*parts, mean, var)
    return mean, var


def run_grad_sums(dy3, x3, mean, p: Plan):
    """Per-channel (Σdy, Σdy·(x − μ)) float64 (C,) (cf_grad_sums / cl_grad_sums)."""
    from ._sums import sum_partials

    ch = p.chunks
    if p.channels_last:
        rows, c = x3.shape
        parts = _partials(ch["blocks"], c, 2)
        (dy_bulk, dy_tail), (x_bulk, x_tail) = (
            _lane_rows(dy3, ch["width"]),
            _lane_rows(x3, ch["width"]),
        )
        sums = _cl().two_pass(_cl_fixed(ch))[1]
        sums(p.parallel, dy_bulk, x_bulk, dy_tail, x_tail, mean, ch["blocks"], *parts)
    else:
        c = x3.shape[1]
        parts = _partials(ch["groups"], c, 2)
        sums = _cf().reductions(_cf_fixed(ch))[1]
        args = (ch["lanes"], ch["groups"], ch["channel_blocks"], ch["pieces"])
        sums(p.parallel, dy3, x3, mean, *args, *parts)
    totals = np.empty(c), np.empty(c)
    for part, total in zip(parts, totals, strict=True):
        sum_partials(part, total)
    return totals


# --------------------------------------------------------------------------- elementwise


def run_affine(x3, m, a, b, p: Plan, stream: bool, out3) -> None:
    """out3 = (x − m)·a + b per channel (cf_affine / cl_affine); m, a, b (C,) float64."""
    coefs = _affine_coefs(x3.dtype, m, a, b)
    ch = p.chunks
    if p.channels_last:
        flat = (x3.reshape(-1), out3.reshape(-1))
        _cl().two_pass(_cl_fixed(ch))[2](
            p.parallel, flat[0], *coefs, ch["width"], ch["blocks"], stream, flat[1]
        )
    else:
        _cf().cf_affine(p.parallel, x3, *coefs, ch["row_blocks"], ch["pieces"], stream, out3)


def run_dx(dy3, x3, m, a, b, d, p: Plan, stream: bool, dx3) -> None:
    """dx3 = A·dy + B·(x − m) + D per channel (cf_dx / cl_dx)."""
    coefs = _affine_coefs(x3.dtype, m, a, b, d)
    ch = p.chunks
    if p.channels_last:
        flat = [a_.reshape(-1) for a_ in (dy3, x3, dx3)]
        _cl().two_pass(_cl_fixed(ch))[3](
            p.parallel, flat[0], flat[1], *coefs, ch["width"], ch["blocks"], stream, flat[2]
        )
    else:
        _cf().cf_dx(p.parallel, dy3, x3, *coefs, ch["row_blocks"], ch["pieces"], stream, dx3)


# --------------------------------------------------------------------------- directions


def run_train_forward(x3, g, b, eps: float, p: Plan, stream: bool, out3):
    """Training forward into out3; returns (mean, var) float64 (C,) (biased var)."""
    c = g.shape[0]
    if p.path == "cf-single-launch":
        mean, var = np.empty(c), np.empty(c)
        _cf().cf_train_forward(p.parallel, x3, g, b, eps, stream, mean, var, out3)
        return mean, var
    if p.path == "cl-single-launch":
        mean, var = np.empty(c), np.empty(c)
        _cl().cl_train_forward(p.parallel, x3, g, b, eps, p.chunks["tiles"], mean, var, out3)
        return mean, var
    mean, var = run_moments(x3, p)
    run_affine(x3, mean, g * (1.0 / np.sqrt(var + eps)), b, p, stream, out3)
    return mean, var


def run_eval_forward(x3, scale, shift, p: Plan, stream: bool, out3) -> None:
    """y = x·scale + shift into out3."""
    run_affine(x3, np.zeros(scale.shape[0]), scale, shift, p, stream, out3)


def run_backward(dy3, x3, mean, rstd, g, p: Plan, stream: bool, dx3):
    """Training backward into dx3; returns (dγ, dβ) float64 (C,)."""
    c = g.shape[0]
    if p.path == "cf-single-launch":
        dgamma, dbeta = np.empty(c), np.empty(c)
        _cf().cf_backward(p.parallel, dy3, x3, mean, rstd, g, stream, dx3, dgamma, dbeta)
        return dgamma, dbeta
    if p.path == "cl-single-launch":
        dgamma, dbeta = np.empty(c), np.empty(c)
        tiles = p.chunks["tiles"]
        _cl().cl_backward(p.parallel, dy3, x3, mean, rstd, g, tiles, dx3, dgamma, dbeta)
        return dgamma, dbeta
    sum_dy, sum_dyxmu = run_grad_sums(dy3, x3, mean, p)
    m = x3.size // c
    dgamma = rstd * sum_dyxmu
    a = g * rstd
    run_dx(dy3, x3, mean, a, -a * rstd * dgamma / m, -a * sum_dy / m, p, stream, dx3)
    return dgamma, sum_dy


def run_eval_backward(dy3, x3, mean, rstd, g, p: Plan, stream: bool, dx3):
    """Inference backward into dx3 (dx = dy·γ·rstd); returns (dγ, dβ) float64 (C,)."""
    sum_dy, sum_dyxmu = run_grad_sums(dy3, x3, mean, p)
    c = g.shape[0]
    run_affine(dy3, np.zeros(c), g * rstd, np.zeros(c), p, stream, dx3)
    return rstd * sum_dyxmu, sum_dy


def statistics(acc, mean64, var64, eps: float):
    """(mean, var, rstd, finite) in the accumulation dtype ``acc``: the float64 statistics
    rounded, rstd = 1/√(var + ε) in that dtype, finite = every mean and variance finite."""
    from ._sums import finish_statistics

    c = mean64.shape[0]
    mean, var, rstd = np.empty(c, acc), np.empty(c, acc), np.empty(c, acc)
    finite = finish_statistics(mean64, var64, eps, mean, var, rstd)
    return mean, var, rstd, bool(finite)


# --------------------------------------------------------------------------- public, checked


def _layout(channels_last: bool) -> str:
    return "NLC" if channels_last else "NCL"


def bn_train_forward(x3, weight, bias, eps, channels_last, out=None):
    """Training forward: returns (y3, mean, var), mean/var (C,) biased, in the accumulation dtype
    (float64 for float64 x, else float32)."""
    from bnlab.functional import _dispatch

    x, c = _checks.view3(x3, "x3", channels_last)
    g, b = _checks.vector(weight, "weight", c), _checks.vector(bias, "bias", c)
    eps = _checks.eps(eps)
    _checks.out(out, x, "out")
    run = _dispatch.bn_train_kernels(x, _layout(channels_last), g, b, eps, out)
    return run.y, run.mean, run.var


def bn_eval_forward(x3, scale, shift, channels_last, out=None):
    """Inference forward: y = x·scale + shift per channel (scale = γ·rstd, shift = β − μ·scale)."""
    from bnlab.functional import _dispatch

    x, c = _checks.view3(x3, "x3", channels_last, empty_ok=True)
    a, b = _checks.vector(scale, "scale", c), _checks.vector(shift, "shift", c)
    _checks.out(out, x, "out")
    return _dispatch.bn_eval_kernels(x, _layout(channels_last), a, b, out)


def _backward_args(dy3, x3, mean, rstd, weight, channels_last, dx):
    x, c = _checks.view3(x3, "x3", channels_last)
    dy = _checks.like(dy3, "dy3", x)
    vectors = [
        _checks.vector(v, n, c) for v, n in ((mean, "mean"), (rstd, "rstd"), (weight, "weight"))
    ]
    _checks.out(dx, x, "dx")
    return dy, x, vectors


def bn_backward(dy3, x3, mean, rstd, weight, channels_last, dx=None):
    """Training backward: returns (dx3, dweight, dbias); dweight/dbias in the accumulation dtype.
    ``dx``: optional buffer for the input gradient (shape and dtype of x3)."""
    from bnlab.functional import _dispatch

    dy, x, (m, r, g) = _backward_args(dy3, x3, mean, rstd, weight, channels_last, dx)
    return _dispatch.bn_backward_kernels(dy, x, _layout(channels_last), m, r, g, True, dx)


def bn_eval_backward(dy3, x3, mean, rstd, weight, channels_last, dx=None):
    """Inference backward (statistics are constants): dx = dy·γ·rstd; dγ = Σdy·x̂; dβ = Σdy."""
    from bnlab.functional import _dispatch

    dy, x, (m, r, g) = _backward_args(dy3, x3, mean, rstd, weight, channels_last, dx)
    return _dispatch.bn_backward_kernels(dy, x, _layout(channels_last), m, r, g, False, dx)


def channel_moments(x3, channels_last):
    """Per-channel (mean, biased var) (C,) of a non-empty 3-D view, in the accumulation dtype:
    the statistics pass of the training forward on its own."""
    from bnlab.functional import _dispatch

    x, _ = _checks.view3(x3, "x3", channels_last)
    return _dispatch.bn_moments_kernels(x, _layout(channels_last))
