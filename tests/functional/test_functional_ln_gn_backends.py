"""Layer norm and group norm on both backends: the numba kernels (``bnlab.kernels.ln_*`` on the
(M, D) view, ``gn_*`` on channels-first (N, C, S)) against the NumPy reference.

* hypothesis over shapes, layouts (channels-last group norm falls back to the reference), dtypes,
  affine or not, non-contiguous input: outputs, gradients, dtypes and shapes agree;
* float64 backward vs the reference with a random upstream gradient (tight tolerance);
* every bad input raises the same error (type and message) on both backends.

Tolerances come from :mod:`bnlab.check`: each backend is within ``dtype_tolerance(dtype, κ)`` of
the exact result, so the two are within twice that of each other.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnlab import functional as F
from bnlab.backend import numba_available
from bnlab.check import centering_condition, dtype_tolerance, rel_error
from bnlab.functional._layout import LAYOUTS, get_layout
from bnlab.functional.layer_norm import NormCache, NormKernelCache
from bnlab.functional.stats import accumulation_dtype

pytestmark = pytest.mark.skipif(not numba_available(), reason="numba backend not installed")

EXAMPLES = 1000 if os.environ.get("CI") == "true" else 100
DTYPES = [np.float16, np.float32, np.float64]
NAMES = ("y", "dx", "dgamma", "dbeta")


def _run(forward, backward, x, dout, backend, *args, **kw):
    y, cache = forward(x, *args, backend=backend, **kw)
    return (y, *backward(dout, cache)), cache


def _assert_backends_agree(ours, ref, dtype, kappa, what):
    for name, a, r in zip(NAMES, ours, ref, strict=True):
        if r is None:
            assert a is None, f"{what} {name}: numba returned a value, the reference None"
            continue
        assert a.shape == r.shape, f"{what} {name}: shape {a.shape} != {r.shape}"
        assert a.dtype == r.dtype, f"{what} {name}: dtype {a.dtype} != {r.dtype}"
        tol = 2 * dtype_tolerance(dtype, kappa, gradient=name != "y")
        err = rel_error(a, r)
        assert err <= tol, f"{what} {name}: numba vs numpy {err:.2e} > {tol:.1e} ({dtype})"


def _maybe_non_contiguous(a: np.ndarray, flag: bool) -> np.ndarray:
    """The same values in a strided (non-C-contiguous) array when ``flag``."""
    if not flag:
        return a
    base = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
    base[..., ::2] = a
    view = base[..., ::2]
    assert a.shape[-1] == 1 or not view.flags.c_contiguous
    return view


@st.composite
def _data(draw, shape, dtype):
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from([0.1, 1.0, 30.0]))
    offset = scale * draw(st.sampled_from([0.0, -3.0, 10.0]))
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * scale + offset).astype(dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    return x, dout, rng


def _affine(draw, rng, shape, dtype):
    """γ, β each present or None independently (the reference's dγ/dβ follow γ alone)."""
    g = (rng.standard_normal(shape) * 0.5 + 1).astype(dtype) if draw(st.booleans()) else None
    b = rng.standard_normal(shape).astype(dtype) if draw(st.booleans()) else None
    return g, b


@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_layer_norm_numba_matches_numpy(data):
    draw = data.draw
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    lead = draw(st.lists(st.integers(1, 4), min_size=0, max_size=3))
    norm = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=3)))
    x, dout, rng = draw(_data(tuple(lead) + norm, dtype))
    pdt = draw(st.sampled_from(DTYPES))
    g, b = _affine(draw, rng, norm, pdt)
    x = _maybe_non_contiguous(x, draw(st.booleans()))
    eps = draw(st.sampled_from([1e-5, 1e-2, 0.5]))
    arg = norm[0] if len(norm) == 1 and draw(st.booleans()) else norm
    fwd, bwd, args = F.layer_norm_forward, F.layer_norm_backward, (arg, g, b, eps)
    ours, cache = _run(fwd, bwd, x, dout, "numba", *args)
    ref, ref_cache = _run(fwd, bwd, x, dout, "numpy", *args)
    assert isinstance(cache, NormKernelCache) and isinstance(ref_cache, NormCache)
    assert ours[0].dtype == dtype and ours[1].dtype == dtype
    acc = accumulation_dtype(dtype)
    assert cache.mean.dtype == acc and cache.rstd.dtype == acc  # float16: statistics in float32
    kappa = centering_condition(x.astype(np.float64), ref_cache.rstd)
    _assert_backends_agree(ours, ref, dtype, kappa, f"layer_norm x{x.shape} {norm}")


@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_group_norm_numba_matches_numpy(data):
    draw = data.draw
    layout = draw(st.sampled_from(sorted(LAYOUTS)))
    lay = get_layout(layout)
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    groups = draw(st.integers(1, 4))
    c = groups * draw(st.integers(1, 3))
    dims = [draw(st.integers(1, 5)) for _ in range(lay.ndim)]
    dims[lay.channel_axis] = c
    x, dout, rng = draw(_data(tuple(dims), dtype))
    g, b = _affine(draw, rng, (c,), draw(st.sampled_from(DTYPES)))
    x = _maybe_non_contiguous(x, draw(st.booleans()))
    eps = draw(st.sampled_from([1e-5, 1e-2, 0.5]))
    if draw(st.booleans()):
        fwd, bwd, args = F.group_norm_forward, F.group_norm_backward, (groups, g, b, eps, layout)
    else:  # instance norm: one channel per group
        fwd, bwd, args = F.instance_norm_forward, F.instance_norm_backward, (g, b, eps, layout)
    ours, cache = _run(fwd, bwd, x, dout, "numba", *args)
    ref, ref_cache = _run(fwd, bwd, x, dout, "numpy", *args)
    # channels-last layouts are not covered by the kernels: the reference runs on both backends
    assert isinstance(cache, NormCache if lay.channels_last else NormKernelCache)
    assert ours[0].dtype == dtype and ours[1].dtype == dtype
    assert cache.rstd.dtype == accumulation_dtype(dtype)
    kappa = centering_condition(x.astype(np.float64), ref_cache.rstd)
    _assert_backends_agree(ours, ref, dtype, kappa, f"{fwd.__name__} {layout} x{x.shape}")


# --------------------------------------------------------------------------- float64 gradients


def _tight(a, r, what):
    np.testing.assert_allclose(a, r, rtol=1e-10, atol=1e-12, err_msg=what)


@pytest.mark.parametrize(
    ("shape", "normalized"),
    [((6, 11), (11,)), ((3, 4, 5, 6), (5, 6)), ((2, 3, 7), (2, 3, 7)), ((4, 1), (1,))],
)
def test_layer_norm_float64_backward_matches_reference(rng, shape, normalized):
    x = 2.0 + 3.0 * rng.standard_normal(shape)
    dout = rng.standard_normal(shape)  # random upstream gradient (ones would hide dx bugs)
    g = rng.standard_normal(normalized) * 0.5 + 1
    b = rng.standard_normal(normalized)
    ours, _ = _run(F.layer_norm_forward, F.layer_norm_backward, x, dout, "numba", normalized, g, b)
    ref, _ = _run(F.layer_norm_forward, F.layer_norm_backward, x, dout, "numpy", normalized, g, b)
    for name, a, r in zip(NAMES, ours, ref, strict=True):
        assert a.dtype == np.float64
        _tight(a, r, f"layer_norm {shape} {name}")


@pytest.mark.parametrize(
    ("layout", "shape", "groups"),
    [("NCHW", (3, 6, 4, 5), 3), ("NCHW", (2, 8, 7, 7), 8), ("NCL", (4, 6, 9), 2),
     ("NC", (5, 6), 3), ("NC", (5, 6), 1), ("NHWC", (2, 3, 4, 6), 2), ("NLC", (3, 5, 4), 4)],
)  # fmt: skip
def test_group_norm_float64_backward_matches_reference(rng, layout, shape, groups):
    x = -1.0 + 2.0 * rng.standard_normal(shape)
    dout = rng.standard_normal(shape)  # random upstream gradient
    c = shape[get_layout(layout).channel_axis]
    g, b = rng.standard_normal(c) * 0.5 + 1, rng.standard_normal(c)
    args = (groups, g, b, 1e-5, layout)
    ours, _ = _run(F.group_norm_forward, F.group_norm_backward, x, dout, "numba", *args)
    ref, _ = _run(F.group_norm_forward, F.group_norm_backward, x, dout, "numpy", *args)
    for name, a, r in zip(NAMES, ours, ref, strict=True):
        assert a.dtype == np.float64
        _tight(a, r, f"group_norm {layout} {shape} G={groups} {name}")


def test_float64_gradients_match_torch_autograd(rng):
    """The numba path against an independent implementation, random upstream gradient."""
    torch = pytest.importorskip("torch")
    x = 1.0 + 2.0 * rng.standard_normal((3, 6, 4, 5))
    dout = rng.standard_normal(x.shape)
    for kind in ("layer_norm", "group_norm"):
        pshape = (4, 5) if kind == "layer_norm" else (6,)
        g, b = rng.standard_normal(pshape), rng.standard_normal(pshape)
        if kind == "layer_norm":
            y, cache = F.layer_norm_forward(x, pshape, g, b, backend="numba")
            dx, dg, db = F.layer_norm_backward(dout, cache)
        else:
            y, cache = F.group_norm_forward(x, 3, g, b, backend="numba")
            dx, dg, db = F.group_norm_backward(dout, cache)
        assert isinstance(cache, NormKernelCache)
        tx, tg, tb = (torch.tensor(a, requires_grad=True) for a in (x, g, b))
        if kind == "layer_norm":
            ty = torch.nn.functional.layer_norm(tx, pshape, tg, tb, eps=1e-5)
        else:
            ty = torch.nn.functional.group_norm(tx, 3, tg, tb, eps=1e-5)
        ty.backward(torch.tensor(dout))
        for name, a, t in zip(NAMES, (y, dx, dg, db), (ty.detach(), tx.grad, tg.grad, tb.grad),
                              strict=True):  # fmt: skip
            _tight(a, t.numpy(), f"{kind} {name} vs torch")


# --------------------------------------------------------------------------- edge cases


def test_layer_norm_empty_input_same_on_both_backends():
    """The kernels refuse empty input; the numba backend then takes the reference, like numpy."""
    x = np.zeros((0, 4), np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        results = [F.layer_norm_forward(x, 4, backend=be) for be in ("numba", "numpy")]
        (y1, c1), (y2, c2) = results
        grads = [F.layer_norm_backward(np.zeros_like(x), c) for c in (c1, c2)]
    assert y1.shape == y2.shape == x.shape and y1.dtype == y2.dtype == x.dtype
    assert grads[0][0].shape == grads[1][0].shape == x.shape


def test_numba_cache_backward_accepts_dout_of_another_dtype_and_strides(rng):
    x = rng.standard_normal((4, 6, 3)).astype(np.float32)
    # a float64, non-contiguous upstream gradient on float32 input
    dout = rng.standard_normal((4, 3, 6)).transpose(0, 2, 1)
    assert not dout.flags.c_contiguous
    g = rng.standard_normal(6).astype(np.float32)
    cases = [
        (F.layer_norm_forward, F.layer_norm_backward, (3,), None, None),
        (F.group_norm_forward, F.group_norm_backward, 2, g, None, 1e-5, "NCL"),
    ]
    for fwd, bwd, *rest in cases:
        ours, _ = _run(fwd, bwd, x, dout, "numba", *rest)
        ref, _ = _run(fwd, bwd, x, dout, "numpy", *rest)
        _assert_backends_agree(ours, ref, np.dtype(np.float32), 1.0, fwd.__name__)


def test_default_backend_follows_the_switch(rng):
    from bnlab.backend import get_backend, set_backend

    x = rng.standard_normal((3, 4, 5))
    before = get_backend()
    try:
        for name, kind in (("numba", NormKernelCache), ("numpy", NormCache)):
            set_backend(name)
            assert isinstance(F.layer_norm_forward(x, 5)[1], kind)
            assert isinstance(F.group_norm_forward(x, 2, layout="NCL")[1], kind)
            assert isinstance(F.instance_norm_forward(x, layout="NCL")[1], kind)
    finally:
        set_backend(before)


# --------------------------------------------------------------------------- bad input


def _outcome(call):
    try:
        call()
    except Exception as e:  # noqa: BLE001 - the point is to compare whatever is raised
        return type(e), str(e)
    return None


X = np.ones((2, 4, 3), np.float32)

LN_BAD = {
    "x list": lambda be: F.layer_norm_forward([[1.0, 2.0]], 2, backend=be),
    "x int": lambda be: F.layer_norm_forward(np.ones((2, 3), np.int64), 3, backend=be),
    "eps 0": lambda be: F.layer_norm_forward(X, 3, eps=0.0, backend=be),
    "eps bool": lambda be: F.layer_norm_forward(X, 3, eps=True, backend=be),
    "eps nan": lambda be: F.layer_norm_forward(X, 3, eps=float("nan"), backend=be),
    "shape mismatch": lambda be: F.layer_norm_forward(X, (4,), backend=be),
    "shape empty": lambda be: F.layer_norm_forward(X, (), backend=be),
    "shape float": lambda be: F.layer_norm_forward(X, (3.0,), backend=be),
    "shape bool": lambda be: F.layer_norm_forward(X, True, backend=be),
    "shape too long": lambda be: F.layer_norm_forward(X, (1, 2, 4, 3), backend=be),
    "gamma shape": lambda be: F.layer_norm_forward(X, 3, np.ones(4), backend=be),
    "gamma int": lambda be: F.layer_norm_forward(X, 3, np.ones(3, np.int32), backend=be),
    "beta list": lambda be: F.layer_norm_forward(X, 3, None, [0.0, 0.0, 0.0], backend=be),
    "beta shape": lambda be: F.layer_norm_forward(X, (4, 3), None, np.zeros(3), backend=be),
}

GN_BAD = {
    "x list": lambda be: F.group_norm_forward([[1.0]], 1, layout="NC", backend=be),
    "x int": lambda be: F.group_norm_forward(np.ones((2, 4), np.int8), 2, layout="NC", backend=be),
    "ndim": lambda be: F.group_norm_forward(X, 2, backend=be),
    "layout": lambda be: F.group_norm_forward(X, 2, layout="NCDHW", backend=be),
    "groups not divisor": lambda be: F.group_norm_forward(X, 3, layout="NCL", backend=be),
    "groups float": lambda be: F.group_norm_forward(X, 2.0, layout="NCL", backend=be),
    "groups bool": lambda be: F.group_norm_forward(X, True, layout="NCL", backend=be),
    "groups zero": lambda be: F.group_norm_forward(X, 0, layout="NCL", backend=be),
    "groups negative": lambda be: F.group_norm_forward(X, -2, layout="NCL", backend=be),
    "empty": lambda be: F.group_norm_forward(X[:0], 2, layout="NCL", backend=be),
    "empty spatial": lambda be: F.group_norm_forward(X[:, :, :0], 2, layout="NCL", backend=be),
    "empty channels-last": lambda be: F.group_norm_forward(X[:0], 3, layout="NLC", backend=be),
    "eps negative": lambda be: F.group_norm_forward(X, 2, None, None, -1.0, "NCL", backend=be),
    "eps string": lambda be: F.group_norm_forward(X, 2, None, None, "1e-5", "NCL", backend=be),
    "gamma shape": lambda be: F.group_norm_forward(X, 2, np.ones(3), layout="NCL", backend=be),
    "gamma 2-D": lambda be: F.group_norm_forward(X, 2, np.ones((4, 1)), layout="NCL", backend=be),
    "beta int": lambda be: F.group_norm_forward(
        X, 2, None, np.zeros(4, int), 1e-5, "NCL", backend=be
    ),
    "beta channels-last": lambda be: F.group_norm_forward(
        X, 3, None, np.zeros(4), 1e-5, "NLC", backend=be
    ),
    "instance ndim": lambda be: F.instance_norm_forward(X, backend=be),
    "instance gamma": lambda be: F.instance_norm_forward(X, np.ones(3), layout="NCL", backend=be),
}


def _backward_bad(forward, backward, dout):
    def call(be):
        _, cache = forward(be)
        return backward(dout, cache)

    return call


BACKWARD_BAD = {
    f"{kind} dout {what}": _backward_bad(fwd, bwd, dout)
    for kind, fwd, bwd in [
        ("layer_norm", lambda be: F.layer_norm_forward(X, (4, 3), backend=be),
         F.layer_norm_backward),
        ("group_norm", lambda be: F.group_norm_forward(X, 2, layout="NCL", backend=be),
         F.group_norm_backward),
        ("instance_norm", lambda be: F.instance_norm_forward(X, layout="NCL", backend=be),
         F.instance_norm_backward),
    ]
    for what, dout in [("shape", X[:1]), ("int", X.astype(np.int32)), ("list", X.tolist()),
                       ("transposed", X.transpose(0, 2, 1)), ("0-d", np.float32(1.0))]
}  # fmt: skip


BAD = {
    **{f"layer_norm {k}": v for k, v in LN_BAD.items()},
    **{f"group_norm {k}": v for k, v in GN_BAD.items()},
    **BACKWARD_BAD,
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_same_error_on_both_backends(name):
    call = BAD[name]
    numba_err, numpy_err = _outcome(lambda: call("numba")), _outcome(lambda: call("numpy"))
    assert numpy_err is not None, f"{name}: the reference accepted it"
    assert numba_err == numpy_err


def test_bad_backend_name_is_rejected_by_both_functions():
    for call in (lambda: F.layer_norm_forward(X, 3, backend="cuda"),
                 lambda: F.group_norm_forward(X, 2, layout="NCL", backend="cuda")):  # fmt: skip
        with pytest.raises(ValueError, match="backend must be one of"):
            call()
