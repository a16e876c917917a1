"""Bad input: a clear error naming the argument and what was expected, and the buffers untouched.

Every batch-norm case runs on every backend (validation must not depend on the backend) in
training mode with buffers, and checks running_mean, running_var and num_batches_tracked
against copies taken before the call.
"""

from __future__ import annotations

import numpy as np
import pytest

from bnlab import functional as F
from bnlab.errors import DTypeError, ShapeError


def _good(rng):
    """A valid training call (NCHW, C=3); each case changes one thing."""
    return {
        "x": rng.standard_normal((4, 3, 2, 5)),
        "gamma": rng.standard_normal(3) + 1,
        "beta": rng.standard_normal(3),
        "training": True,
        "running_mean": rng.standard_normal(3),
        "running_var": rng.uniform(0.5, 2, 3),
        "num_batches_tracked": np.array(4),
        "layout": "NCHW",
    }


# name -> (changes to the valid call, exception type, regex the message must match)
BN_CASES = {
    "x 3-D for NCHW": ({"x": np.zeros((4, 3, 5))}, ShapeError, r"x must be 4-D \(N, C, H, W\)"),
    "x 4-D for NC": ({"layout": "NC"}, ShapeError, r"x must be 2-D \(N, C\) for layout 'NC'"),
    "x 2-D for NHWC": ({"x": np.zeros((4, 3)), "layout": "NHWC"}, ShapeError, r"x must be 4-D"),
    "unknown layout": ({"layout": "NCWH"}, ValueError, r"layout must be one of .*'NCWH'"),
    "layout lowercase": ({"layout": "nchw"}, ValueError, r"layout must be one of"),
    "unknown convention": ({"convention": "tf"}, ValueError, r"convention must be one of .*'tf'"),
    "gamma channels": ({"gamma": np.ones(4)}, ShapeError, r"gamma must have shape \(3,\).*\(4,\)"),
    "beta channels": ({"beta": np.ones(2)}, ShapeError, r"beta must have shape \(3,\)"),
    "gamma 2-D": ({"gamma": np.ones((1, 3))}, ShapeError, r"gamma must have shape \(3,\)"),
    "running_mean channels": (
        {"running_mean": np.zeros(4)}, ShapeError, r"running_mean must have shape \(3,\)"
    ),
    "running_var channels": (
        {"running_var": np.ones(5)}, ShapeError, r"running_var must have shape \(3,\)"
    ),
    "channels of NHWC taken from the last axis": (
        {"x": np.zeros((4, 3, 2, 5)), "layout": "NHWC"}, ShapeError, r"gamma must have shape \(5,\)"
    ),
    "one value per channel NC": (
        {"x": np.ones((1, 3)), "layout": "NC"}, ValueError,
        r"Expected more than 1 value per channel when training",
    ),
    "one value per channel NCHW": (
        {"x": np.ones((1, 3, 1, 1))}, ValueError,
        r"Expected more than 1 value per channel when training",
    ),
    "empty batch": ({"x": np.ones((0, 3, 2, 2))}, ShapeError, r"x must not be empty"),
    "integer x": ({"x": np.ones((4, 3, 2, 5), np.int64)}, DTypeError, r"x must have a floating"),
    "bool x": ({"x": np.ones((4, 3, 2, 5), bool)}, DTypeError, r"x must have a floating"),
    "list x": ({"x": [[1.0, 2.0]]}, DTypeError, r"x must be a numpy.ndarray"),
    "integer gamma": ({"gamma": np.ones(3, np.int32)}, DTypeError, r"gamma must have a floating"),
    "integer running_var": (
        {"running_var": np.ones(3, np.int64)}, DTypeError, r"running_var must have a floating"
    ),
    "eps zero": ({"eps": 0.0}, ValueError, r"eps must be a finite float > 0, got 0.0"),
    "eps negative": ({"eps": -1e-5}, ValueError, r"eps must be a finite float > 0"),
    "eps nan": ({"eps": float("nan")}, ValueError, r"eps must be a finite float > 0"),
    "eps string": ({"eps": "1e-5"}, TypeError, r"eps must be a positive float"),
    "momentum negative": ({"momentum": -0.1}, ValueError, r"momentum must be in \[0, 1\]"),
    "momentum above one": ({"momentum": 1.5}, ValueError, r"momentum must be in \[0, 1\]"),
    "momentum string": ({"momentum": "fast"}, TypeError, r"momentum must be a float in \[0, 1\]"),
    "training not bool": ({"training": "yes"}, TypeError, r"training must be True or False"),
    "training None": ({"training": None}, TypeError, r"training must be True or False"),
    "on_nonfinite": ({"on_nonfinite": "ignore"}, ValueError, r"on_nonfinite must be one of"),
    "buffers not paired": ({"running_var": None}, ValueError, r"given together"),
    "counter not an array": (
        {"num_batches_tracked": 3}, DTypeError, r"num_batches_tracked must be a 0-d integer"
    ),
    "momentum None without counter": (
        {"momentum": None, "num_batches_tracked": None}, ValueError, r"needs num_batches_tracked"
    ),
    "read-only running_mean": ({"_readonly": True}, ValueError, r"running_mean must be writable"),
    "out of the wrong dtype": (
        {"out": np.zeros((4, 3, 2, 5), np.float32)}, ShapeError, r"out must be an ndarray"
    ),
    "read-only out": ({"_readonly_out": True}, ValueError, r"out must be writable"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BN_CASES))
def test_batch_norm_bad_input(rng, case, backend):
    changes, exc, pattern = BN_CASES[case]
    kw = _good(rng)
    kw.update({k: v for k, v in changes.items() if not k.startswith("_")})
    if changes.get("_readonly"):
        kw["running_mean"].flags.writeable = False
    if changes.get("_readonly_out"):
        kw["out"] = np.zeros_like(kw["x"])
        kw["out"].flags.writeable = False
    buffers = {k: kw[k] for k in ("running_mean", "running_var", "num_batches_tracked")}
    before = {k: np.copy(v) for k, v in buffers.items() if isinstance(v, np.ndarray)}
    x = kw.pop("x")
    gamma, beta = kw.pop("gamma"), kw.pop("beta")
    with pytest.raises(exc, match=pattern):
        F.batch_norm_forward(x, gamma, beta, backend=backend, **kw)
    for k, v in before.items():
        np.testing.assert_array_equal(buffers[k], v, err_msg=f"{k} changed")


def test_inference_needs_running_stats(rng, backend):
    with pytest.raises(ValueError, match="running_mean and running_var are required"):
        F.batch_norm_forward(rng.standard_normal((2, 3)), None, None, training=False, layout="NC",
                             backend=backend)  # fmt: skip


def test_inference_accepts_one_value_per_channel(rng, backend):
    """Only *training* needs more than one value per channel (PyTorch behaves the same)."""
    rm, rv = np.zeros(3), np.ones(3)
    y, _ = F.batch_norm_forward(np.ones((1, 3)), None, None, training=False, running_mean=rm,
                                running_var=rv, layout="NC", backend=backend)  # fmt: skip
    np.testing.assert_allclose(y, 1 / np.sqrt(1 + 1e-5))


def test_unknown_backend(rng):
    with pytest.raises(ValueError, match=r"backend must be one of"):
        F.batch_norm_forward(rng.standard_normal((2, 3)), None, None, training=True, layout="NC",
                             backend="cuda")  # fmt: skip


def test_backward_checks_dout(rng):
    _, cache = F.batch_norm_forward(rng.standard_normal((4, 3)), None, None, training=True,
                                    layout="NC")  # fmt: skip
    with pytest.raises(ShapeError, match=r"dout must have the shape of x \(4, 3\)"):
        F.batch_norm_backward(np.ones((4, 2)), cache)
    with pytest.raises(DTypeError, match=r"dout must have a floating"):
        F.batch_norm_backward_graph(np.ones((4, 3), np.int64), cache)
    with pytest.raises(TypeError, match=r"cache must be the BatchNormCache"):
        F.batch_norm_backward(np.ones((4, 3)), {"x": 1})


@pytest.mark.parametrize("training", [True, False])
def test_backward_refuses_a_read_only_out(rng, backend, training):
    """The kernels write dx straight into ``out``: a read-only one is an error naming it (the
    numba backend would otherwise fail to compile a write into it)."""
    x = rng.standard_normal((4, 3))
    rm, rv = np.zeros(3), np.ones(3)
    _, cache = F.batch_norm_forward(x, None, None, training=training, running_mean=rm,
                                    running_var=rv, layout="NC", backend=backend)  # fmt: skip
    out = np.zeros_like(x)
    out.flags.writeable = False
    with pytest.raises(ValueError, match=r"out must be writable"):
        F.batch_norm_backward(rng.standard_normal((4, 3)), cache, out=out)
    np.testing.assert_array_equal(out, 0)


def test_torch_style_wrapper_validates_too(rng):
    rm, rv = np.zeros(3), np.ones(3)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
        F.batch_norm(rng.standard_normal((4, 3)), rm, rv, training=True, momentum=2.0, layout="NC")
    with pytest.raises(ShapeError, match=r"running_mean must have shape \(4,\)"):
        F.batch_norm(rng.standard_normal((4, 4)), rm, rv, training=True, layout="NC")
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)


# --------------------------------------------------------------------------- layer / group norm

LN_CASES = {
    "normalized_shape mismatch": (
        {"normalized_shape": (4,)}, ShapeError, r"normalized_shape \(4,\) must equal the trailing"
    ),
    "normalized_shape too long": (
        {"normalized_shape": (2, 3, 5, 1)}, ShapeError, r"normalized_shape"
    ),
    "normalized_shape empty": (
        {"normalized_shape": ()}, ShapeError, r"normalized_shape must be an int or a non-empty"
    ),
    "normalized_shape float": (
        {"normalized_shape": 5.0}, ShapeError, r"normalized_shape must be an int or a non-empty"
    ),
    "normalized_shape string": (
        {"normalized_shape": "5"}, ShapeError, r"normalized_shape must be an int or a non-empty"
    ),
    "gamma shape": ({"gamma": np.ones(3)}, ShapeError, r"gamma must have shape \(5,\)"),
    "integer x": ({"x": np.ones((2, 3, 5), np.int16)}, DTypeError, r"x must have a floating"),
    "eps": ({"eps": 0}, ValueError, r"eps must be a finite float > 0"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(LN_CASES))
def test_layer_norm_bad_input(rng, case):
    changes, exc, pattern = LN_CASES[case]
    kw = {"x": rng.standard_normal((2, 3, 5)), "normalized_shape": (5,), "gamma": None}
    kw.update(changes)
    with pytest.raises(exc, match=pattern):
        F.layer_norm_forward(kw.pop("x"), kw.pop("normalized_shape"), **kw)


GN_CASES = {
    "groups do not divide C": ({"num_groups": 4}, ValueError, r"num_groups must be a positive "
                               r"divisor of C=6, got 4"),
    "zero groups": ({"num_groups": 0}, ValueError, r"num_groups must be a positive divisor"),
    "float groups": ({"num_groups": 2.0}, TypeError, r"num_groups must be an int"),
    "wrong ndim": ({"x": np.ones((2, 6))}, ShapeError, r"x must be 4-D"),
    "unknown layout": ({"layout": "CHWN"}, ValueError, r"layout must be one of"),
    "gamma channels": ({"gamma": np.ones(3)}, ShapeError, r"gamma must have shape \(6,\)"),
    "integer x": ({"x": np.ones((2, 6, 2, 2), np.int32)}, DTypeError, r"x must have a floating"),
    "eps": ({"eps": -1.0}, ValueError, r"eps must be a finite float > 0"),
    "empty": ({"x": np.ones((0, 6, 2, 2))}, ShapeError, r"x must not be empty"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(GN_CASES))
def test_group_norm_bad_input(rng, case):
    changes, exc, pattern = GN_CASES[case]
    kw = {"x": rng.standard_normal((2, 6, 2, 2)), "num_groups": 3, "layout": "NCHW"}
    kw.update(changes)
    with pytest.raises(exc, match=pattern):
        F.group_norm_forward(kw.pop("x"), kw.pop("num_groups"), **kw)


def test_layer_norm_accepts_numpy_ints(rng):
    x = rng.standard_normal((2, 3, 5))
    y1, _ = F.layer_norm_forward(x, np.int64(5))
    y2, _ = F.layer_norm_forward(x, [np.int32(5)])
    np.testing.assert_array_equal(y1, y2)


def test_norm_backward_checks_dout(rng):
    _, cache = F.layer_norm_forward(rng.standard_normal((2, 5)), 5)
    with pytest.raises(ShapeError, match=r"dout must have the shape of x \(2, 5\)"):
        F.layer_norm_backward(np.ones((5, 2)), cache)


@pytest.mark.parametrize("policy", ["warn", "raise"])
def test_float16_buffers_never_overflow_to_inf(policy):
    """A finite batch whose variance exceeds float16's range must not turn float16 buffers into
    Inf: the update is refused like a non-finite batch and buffers/counter stay as they were."""
    import warnings

    from bnlab.errors import NonFiniteBatchWarning, NonFiniteError
    from bnlab.functional import batch_norm_forward

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((16, 2)) * 3e3).astype(np.float32)  # variance ~ 9e6 > 65504
    rm, rv = np.zeros(2, np.float16), np.ones(2, np.float16)
    counter = np.array(3)
    before = rm.copy(), rv.copy()
    kwargs = dict(training=True, running_mean=rm, running_var=rv, momentum=0.5, layout="NC")
    if policy == "raise":
        with pytest.raises(NonFiniteError, match="overflows"):
            batch_norm_forward(
                x, None, None, num_batches_tracked=counter, on_nonfinite="raise", **kwargs
            )
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            batch_norm_forward(x, None, None, num_batches_tracked=counter, **kwargs)
        assert any(issubclass(w.category, NonFiniteBatchWarning) for w in caught)
    np.testing.assert_array_equal(rm, before[0])
    np.testing.assert_array_equal(rv, before[1])
    assert int(counter) == 3
    assert np.isfinite(rv).all()


@pytest.mark.parametrize(
    ("shape", "layout", "training"),
    [
        ((0, 3, 2, 5), "NCHW", False),  # empty batch, inference
        ((0, 2, 5, 3), "NHWC", False),
        ((4, 3, 0, 5), "NCHW", False),  # empty feature map
        ((4, 0, 2, 5), "NCHW", True),  # no channels: nothing to normalize, even when training
        ((4, 2, 5, 0), "NHWC", True),
        ((4, 0), "NC", True),
    ],
)
def test_batch_norm_of_an_empty_tensor_is_the_same_on_both_backends(shape, layout, training):
    """An empty tensor has nothing to compute: the numba backend hands it to the reference (the
    kernels take non-empty arrays; it used to fail reshaping (0, C, -1))."""
    x = np.zeros(shape, np.float32)
    c = shape[1] if layout == "NCHW" or layout == "NC" else shape[-1]
    results = []
    for be in ("numba", "numpy"):
        rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
        y, cache = F.batch_norm_forward(x, None, None, training=training, running_mean=rm,
                                        running_var=rv, layout=layout, backend=be)  # fmt: skip
        results.append((y, *F.batch_norm_backward(np.zeros_like(x), cache)))
    for ours, ref in zip(*results, strict=True):
        assert ours.shape == ref.shape and ours.dtype == ref.dtype
        np.testing.assert_array_equal(ours, ref)
    assert results[0][0].shape == shape
