"""Property tests: the numba backend against the NumPy reference through the public functional
API, over random shapes (including 1 and odd sizes), layouts, dtypes, eps, momentum, conventions,
affine or not, training and inference. Each example runs a forward and a backward kernel, so the
two tests give every kernel >= 1000 examples under CI.
"""

from __future__ import annotations

import os

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from kernels_tolerances import assert_matches

from bnlab.conventions import PRESETS
from bnlab.functional import batch_norm_backward, batch_norm_forward
from bnlab.kernels import bn_backward, bn_train_forward, paths

EXAMPLES = 1000 if os.environ.get("CI") == "true" else 150
DTYPES = (np.float16, np.float32, np.float64)
CHANNEL_AXIS = {"NC": 1, "NCL": 1, "NLC": 2, "NCHW": 1, "NHWC": 3}
NDIM = {"NC": 2, "NCL": 3, "NLC": 3, "NCHW": 4, "NHWC": 4}


@st.composite
def bn_cases(draw, training: bool):
    layout = draw(st.sampled_from(sorted(NDIM)))
    shape = [draw(st.integers(1, 6)) for _ in range(NDIM[layout])]
    shape[CHANNEL_AXIS[layout]] = draw(st.integers(1, 9))
    if training and np.prod(shape) // shape[CHANNEL_AXIS[layout]] < 2:
        shape[0] = 2  # batch statistics need two values per channel
    return {
        "layout": layout,
        "shape": tuple(shape),
        "dtype": draw(st.sampled_from(DTYPES)),
        "eps": draw(st.sampled_from([1e-5, 1e-3, 0.25])),
        "momentum": draw(st.one_of(st.none(), st.floats(0.0, 1.0))),
        "convention": draw(st.sampled_from(sorted(PRESETS))),
        "affine": draw(st.booleans()),
        "offset": draw(st.floats(-20.0, 20.0)),
        "scale": draw(st.floats(0.1, 10.0)),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


def _run(case, training: bool, backend: str):
    """Forward + backward on fresh copies of the case's data; returns every output and buffer."""
    rng = np.random.default_rng(case["seed"])
    dt = np.dtype(case["dtype"])
    acc = np.float64 if dt == np.float64 else np.float32
    c = case["shape"][CHANNEL_AXIS[case["layout"]]]
    x = (case["offset"] + case["scale"] * rng.standard_normal(case["shape"])).astype(dt)
    dy = rng.standard_normal(case["shape"]).astype(dt)  # random upstream gradient, never ones
    gamma = rng.standard_normal(c).astype(acc) if case["affine"] else None
    beta = rng.standard_normal(c).astype(acc) if case["affine"] else None
    running_mean = rng.standard_normal(c).astype(acc)
    running_var = (0.5 + rng.random(c)).astype(acc)
    tracked = np.array(3)
    y, cache = batch_norm_forward(
        x,
        gamma,
        beta,
        training=training,
        running_mean=running_mean,
        running_var=running_var,
        momentum=case["momentum"],
        eps=case["eps"],
        layout=case["layout"],
        convention=case["convention"],
        num_batches_tracked=tracked,
        backend=backend,
    )
    dx, dgamma, dbeta = batch_norm_backward(dy, cache)
    return {
        "y": y,
        "dx": dx,
        "dgamma": dgamma,
        "dbeta": dbeta,
        "running_mean": running_mean,
        "running_var": running_var,
        "num_batches_tracked": tracked,
    }


def _compare(case, training: bool) -> None:
    got = _run(case, training, "numba")
    ref = _run(case, training, "numpy")
    for name, r in ref.items():
        a = got[name]
        assert a.dtype == r.dtype, f"{name}: dtype {a.dtype} != reference {r.dtype}"
        assert_matches(a, r, case["dtype"], name)


@settings(max_examples=EXAMPLES)
@given(case=bn_cases(training=True))
def test_kernels_training_forward_backward_match_reference(case):
    _compare(case, training=True)


@settings(max_examples=EXAMPLES)
@given(case=bn_cases(training=False))
def test_kernels_inference_forward_backward_match_reference(case):
    _compare(case, training=False)


def _small_chunks(segment, short_row, block_rows, tile, fused):
    """Shrink the limits so that tiny tensors take every path (long and short rows, several
    pieces, groups, channel blocks, row blocks, lane rows with leftover values; the
    single-launch paths when ``fused``, else the two-pass ones). They still run on one thread
    (tiny passes do); test_kernels_determinism runs the same paths on two threads."""
    budget = (1 << 30) if fused else 0
    return paths.limits(
        segment=segment, short_row=short_row, min_tasks=5, min_block_rows=block_rows,
        min_block_values=8, max_tasks=tile + 1, wide_row=3 * tile + 7, tile_min_width=1,
        tile_min_tiles=tile + 1, tile_align=1, tile_bytes=budget, channel_bytes=budget,
        min_single_launch_channels=1,
    )  # fmt: skip


@settings(max_examples=EXAMPLES // 2)
@given(
    n=st.integers(1, 5),
    c=st.integers(1, 7),
    s=st.integers(1, 60),
    channels_last=st.booleans(),
    dtype=st.sampled_from([np.float32, np.float64]),
    segment=st.integers(1, 25),
    short_row=st.integers(1, 40),
    block_rows=st.integers(1, 4),
    tile=st.integers(1, 4),
    fused=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_kernels_every_chunking_path_matches_float64_math(
    n, c, s, channels_last, dtype, segment, short_row, block_rows, tile, fused, seed
):
    """Kernel API with shrunken chunks vs plain float64 NumPy math (statistics, y, dx, dγ, dβ)."""
    rng = np.random.default_rng(seed)
    shape = (n, s, c) if channels_last else (n, c, s)
    axes = (0, 1) if channels_last else (0, 2)
    x = (rng.uniform(-5, 5) + rng.uniform(0.1, 3) * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w, b = rng.standard_normal(c), rng.standard_normal(c)
    with _small_chunks(segment, short_row, block_rows, tile, fused):
        y, mean, var = bn_train_forward(x, w, b, 1e-3, channels_last)
        rstd = 1.0 / np.sqrt(var.astype(np.float64) + 1e-3)
        dx, dw, db = bn_backward(dy, x, mean, rstd.astype(mean.dtype), w, channels_last)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    mu, sig2 = x64.mean(axis=axes, keepdims=True), x64.var(axis=axes, keepdims=True)
    xhat = (x64 - mu) / np.sqrt(sig2 + 1e-3)
    shp = [1, 1, 1]
    shp[2 if channels_last else 1] = c
    g = w.reshape(shp)
    ref_dx = g / np.sqrt(sig2 + 1e-3) * (
        dy64 - dy64.mean(axis=axes, keepdims=True)
        - xhat * (dy64 * xhat).mean(axis=axes, keepdims=True)
    )  # fmt: skip
    m = x.size // c
    if m > 1:
        assert_matches(mean, mu.ravel(), dtype, "mean")
        assert_matches(var, sig2.ravel(), dtype, "var")
        assert_matches(y, xhat * g + b.reshape(shp), dtype, "y")
        assert_matches(dx, ref_dx, dtype, "dx")
        assert_matches(dw, (dy64 * xhat).sum(axis=axes), dtype, "dgamma")
    assert_matches(db, dy64.sum(axis=axes), dtype, "dbeta")
