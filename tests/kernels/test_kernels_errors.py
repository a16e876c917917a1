"""Bad input: the numba backend raises exactly what the NumPy reference raises, leaves every buffer
untouched on a non-finite batch, and the kernels' own 3-D API refuses what would index raw memory
wrongly (wrong vector length, wrong or non-contiguous out) with a clear error."""

from __future__ import annotations

import numpy as np
import pytest

from bnlab.errors import DTypeError, NonFiniteBatchWarning, NonFiniteError, ShapeError
from bnlab.functional import batch_norm_backward, batch_norm_forward
from bnlab.kernels import bn_backward, bn_eval_forward, bn_train_forward

RNG = np.random.default_rng(8)
X = RNG.standard_normal((4, 3, 2, 2)).astype(np.float32)

BAD_CALLS = {  # name -> kwargs of batch_norm_forward that must fail
    "integer x": dict(x=np.ones((4, 3, 2, 2), np.int64)),
    "wrong ndim": dict(x=X[0]),
    "gamma length": dict(gamma=np.ones(4, np.float32)),
    "beta dtype": dict(beta=np.ones(3, np.int32)),
    "eps zero": dict(eps=0.0),
    "eps nan": dict(eps=float("nan")),
    "one value per channel": dict(x=X[:1, :, :1, :1]),
    "empty batch": dict(x=X[:0]),
    "out dtype": dict(out=np.empty(X.shape, np.float64)),
    "out shape": dict(out=np.empty((4, 3, 2), np.float32)),
    "layout": dict(layout="NCWH"),
    "training flag": dict(training=1),
    "momentum": dict(momentum=1.5),
}


def _forward(backend, **overrides):
    kwargs = dict(x=X, gamma=None, beta=None, training=True, layout="NCHW")
    kwargs.update(overrides)
    x = kwargs.pop("x")
    return batch_norm_forward(x, kwargs.pop("gamma"), kwargs.pop("beta"), backend=backend, **kwargs)


@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_kernels_backend_raises_what_the_reference_raises(name):
    errors = []
    for backend in ("numpy", "numba"):
        with pytest.raises((ValueError, TypeError)) as info:
            _forward(backend, **BAD_CALLS[name])
        errors.append(info.value)
    assert type(errors[0]) is type(errors[1])
    assert str(errors[0]) == str(errors[1])


def test_kernels_backward_rejects_wrong_dout_like_the_reference():
    for backend in ("numpy", "numba"):
        _, cache = _forward(backend)
        with pytest.raises(ShapeError, match="dout must have the shape of x"):
            batch_norm_backward(np.ones((4, 3, 2, 3), np.float32), cache)
        with pytest.raises(DTypeError, match="dout"):
            batch_norm_backward(np.ones(X.shape, np.int8), cache)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_kernels_nonfinite_batch_leaves_buffers_untouched(layout, bad):
    x = RNG.standard_normal((4, 3, 5, 3)).astype(np.float32)
    x[2, 1, 3, 2] = bad  # one value, in one channel whichever layout
    rm, rv, tracked = np.full(3, 0.25, np.float32), np.full(3, 2.0, np.float32), np.array(5)
    before = (rm.copy(), rv.copy(), tracked.copy())
    kwargs = dict(running_mean=rm, running_var=rv, num_batches_tracked=tracked, layout=layout)
    with pytest.warns(NonFiniteBatchWarning):
        y, _ = batch_norm_forward(x, None, None, training=True, backend="numba", **kwargs)
    assert not np.isfinite(y).all()
    with pytest.raises(NonFiniteError):
        batch_norm_forward(
            x, None, None, training=True, on_nonfinite="raise", backend="numba", **kwargs
        )
    for got, want in zip((rm, rv, tracked), before, strict=True):
        assert got.tobytes() == want.tobytes()


def test_kernels_finite_channels_of_a_nonfinite_batch_keep_their_statistics():
    """A NaN in channel 1 makes channel 1's statistics NaN and nothing else."""
    x = RNG.standard_normal((6, 3, 4)).astype(np.float64)
    x[3, 1, 2] = np.nan
    _, mean, var = bn_train_forward(x, np.ones(3), np.zeros(3), 1e-5, False)
    assert np.isnan(mean[1]) and np.isnan(var[1])
    np.testing.assert_allclose(mean[[0, 2]], x[:, [0, 2]].mean(axis=(0, 2)), rtol=1e-13)


def test_kernels_non_contiguous_out_is_filled_through_the_functional_api():
    """A non-contiguous out= (a transposed view) receives the result, like with NumPy."""
    x = RNG.standard_normal((5, 3, 4)).astype(np.float32)
    results = []
    for backend in ("numpy", "numba"):
        base = np.zeros((4, 3, 5), np.float32)
        out = base.transpose(2, 1, 0)  # shape (5, 3, 4), not C-contiguous
        y, _ = batch_norm_forward(x, None, None, training=True, layout="NCL", out=out,
                                  backend=backend)  # fmt: skip
        assert y is out
        results.append(base.copy())
    np.testing.assert_allclose(results[1], results[0], rtol=1e-5, atol=1e-6)
    assert np.abs(results[1]).sum() > 0


X3 = RNG.standard_normal((2, 3, 4)).astype(np.float32)
ONES = np.ones(3, np.float32)
KERNEL_BAD_CALLS = {
    "x3 is a list": (lambda: bn_eval_forward(X3.tolist(), ONES, ONES, False), DTypeError, "x3"),
    "x3 integer": (
        lambda: bn_eval_forward(X3.astype(np.int32), ONES, ONES, False),
        DTypeError,
        "x3",
    ),
    "x3 2-D": (lambda: bn_eval_forward(X3[0], ONES, ONES, False), ShapeError, "x3"),
    "scale length": (lambda: bn_eval_forward(X3, np.ones(4), ONES, False), ShapeError, "scale"),
    "weight length channels_last": (
        lambda: bn_train_forward(X3, ONES, ONES, 1e-5, True),
        ShapeError,
        "weight",
    ),
    "eps negative": (lambda: bn_train_forward(X3, ONES, ONES, -1.0, False), ValueError, "eps"),
    "empty": (lambda: bn_train_forward(X3[:0], ONES, ONES, 1e-5, False), ShapeError, "empty"),
    "out non-contiguous": (
        lambda: bn_eval_forward(X3, ONES, ONES, False, out=np.empty((4, 3, 2), np.float32).T),
        ShapeError,
        "C-contiguous",
    ),
    "out dtype": (
        lambda: bn_eval_forward(X3, ONES, ONES, False, out=np.empty(X3.shape)),
        ShapeError,
        "out",
    ),
    "dy3 shape": (lambda: bn_backward(X3[:1], X3, ONES, ONES, ONES, False), ShapeError, "dy3"),
    "rstd length": (lambda: bn_backward(X3, X3, ONES, np.ones(2), ONES, False), ShapeError, "rstd"),
    "dx read-only": (
        lambda: bn_backward(X3, X3, ONES, ONES, ONES, False, dx=_readonly(X3.shape)),
        ShapeError,
        "dx",
    ),
}


def _readonly(shape):
    a = np.zeros(shape, np.float32)
    a.flags.writeable = False
    return a


@pytest.mark.parametrize("name", sorted(KERNEL_BAD_CALLS))
def test_kernels_api_rejects_bad_input_with_a_named_error(name):
    call, err, word = KERNEL_BAD_CALLS[name]
    with pytest.raises(err, match=word):
        call()


@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 3, 0), (2, 0, 4)])
def test_kernels_statistics_of_an_empty_tensor_are_refused(shape):
    """channel_moments (the statistics pass on its own) must not read past x."""
    from bnlab.kernels import channel_moments

    for channels_last in (False, True):
        with pytest.raises(ShapeError, match="empty"):
            channel_moments(np.empty(shape, np.float32), channels_last)


def test_kernels_rejected_out_is_untouched():
    out = np.full((2, 3, 4), 7.0, np.float32)
    with pytest.raises(ShapeError):
        bn_eval_forward(X3, np.ones(4, np.float32), ONES, False, out=out)
    assert (out == 7.0).all()


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_kernels_take_byte_swapped_arrays_like_native_ones(layout, dtype):
    """Big-endian data (e.g. read from a file) is valid input: the numba backend gives the
    results of native data for x, dout, out= and running buffers in that byte order (numba itself
    cannot type such arrays, so they are staged through native copies) — in the same
    accumulation dtype (">f8" is not == np.float64: float64 data once got float32 statistics)."""
    rng = np.random.default_rng(7)
    shape = (4, 3, 5, 6) if layout == "NCHW" else (4, 5, 6, 3)
    x, dy = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
    results = {}
    for order in ("<", ">"):
        dt = np.dtype(dtype).newbyteorder(order)
        rm, rv = np.zeros(3, dt), np.ones(3, dt)
        out = np.empty(shape, dt)
        y, cache = batch_norm_forward(
            x.astype(dt), None, None, training=True, running_mean=rm, running_var=rv,
            layout=layout, backend="numba", out=out,
        )  # fmt: skip
        dx, dg, db = batch_norm_backward(dy.astype(dt), cache)
        assert y is out and rm.dtype == dt
        results[order] = [np.asarray(a, np.float64) for a in (y, dx, dg, db, rm, rv)]
    for big, little in zip(results[">"], results["<"], strict=True):
        np.testing.assert_array_equal(big, little)


def test_renorm_batch_moments_take_byte_swapped_arrays():
    from bnlab.functional._layout import get_layout
    from bnlab.functional.renorm import batch_moments

    x = np.random.default_rng(8).standard_normal((6, 3, 4, 4)).astype(np.float32)
    lay = get_layout("NCHW")
    native = batch_moments(x, lay, "numba")
    swapped = batch_moments(x.astype(">f4"), lay, "numba")
    for a, b in zip(native, swapped, strict=True):
        np.testing.assert_array_equal(a, b)
