"""Running statistics over 20 training steps: PyTorch for the ``pytorch`` preset, the textbooks'
update formulas (written out here, not imported) for ``cs231n``, ``d2l``, ``keras`` and ``flax``;
``momentum=None`` against PyTorch; non-finite batches never reach the buffers."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from fn_support import LAYOUT_NAMES, channels, random_affine, to_channels_first

from bnlab import functional as F
from bnlab.errors import NonFiniteBatchWarning, NonFiniteError

STEPS = 20
SHAPES = {
    "NC": (6, 3),
    "NCL": (3, 3, 5),
    "NLC": (3, 5, 3),
    "NCHW": (2, 3, 3, 5),
    "NHWC": (2, 3, 5, 3),
}


def _batches(rng, shape, steps=STEPS):
    """Batches whose mean and scale drift, so the moving average is actually exercised."""
    for t in range(steps):
        yield rng.standard_normal(shape) * (1 + 0.2 * t) + 0.5 * t - 2


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
@pytest.mark.parametrize("momentum", [0.1, 0.35])
def test_pytorch_preset_matches_torch_over_20_steps(rng, layout, momentum, backend):
    torch = pytest.importorskip("torch")
    shape = SHAPES[layout]
    c = channels(shape, layout)
    g, b = random_affine(rng, c)
    rm, rv = np.zeros(c), np.ones(c)
    rm_t, rv_t = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    for x in _batches(rng, shape):
        y, _ = F.batch_norm_forward(
            x, g, b, training=True, running_mean=rm, running_var=rv, momentum=momentum,
            layout=layout, convention="pytorch", backend=backend,
        )  # fmt: skip
        y_t = torch.nn.functional.batch_norm(
            torch.tensor(to_channels_first(x, layout)), rm_t, rv_t, torch.tensor(g),
            torch.tensor(b), training=True, momentum=momentum,
        )  # fmt: skip
        np.testing.assert_allclose(to_channels_first(y, layout), y_t.numpy(), atol=1e-10)
        np.testing.assert_allclose(rm, rm_t.numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(rv, rv_t.numpy(), rtol=1e-12, atol=1e-12)
    # and inference with the accumulated statistics
    x = rng.standard_normal(shape)
    y, _ = F.batch_norm_forward(
        x, g, b, training=False, running_mean=rm, running_var=rv, layout=layout, backend=backend
    )
    y_t = torch.nn.functional.batch_norm(
        torch.tensor(to_channels_first(x, layout)), rm_t, rv_t, torch.tensor(g), torch.tensor(b)
    )
    np.testing.assert_allclose(to_channels_first(y, layout), y_t.numpy(), atol=1e-10)


def test_torch_style_batch_norm_wrapper_matches_torch(rng):
    torch = pytest.importorskip("torch")
    rm, rv = np.zeros(4), np.ones(4)
    rm_t, rv_t = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    w, b = random_affine(rng, 4)
    for x in _batches(rng, (3, 4, 2, 3), steps=5):
        y = F.batch_norm(x, rm, rv, w, b, training=True, momentum=0.2, eps=1e-3)
        y_t = torch.nn.functional.batch_norm(
            torch.tensor(x), rm_t, rv_t, torch.tensor(w), torch.tensor(b), True, 0.2, 1e-3
        )
        np.testing.assert_allclose(y, y_t.numpy(), atol=1e-10)
    np.testing.assert_allclose(rm, rm_t.numpy(), atol=1e-12)
    np.testing.assert_allclose(rv, rv_t.numpy(), atol=1e-12)


@pytest.mark.parametrize("layout", ["NC", "NCHW", "NHWC"])
def test_momentum_none_is_torch_cumulative_average(rng, layout, backend):
    """momentum=None: nn.BatchNormXd(momentum=None) weights the k-th batch by 1/k."""
    torch = pytest.importorskip("torch")
    shape = SHAPES[layout]
    c = channels(shape, layout)
    module = (torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d)(
        c, momentum=None, dtype=torch.float64
    )
    rm, rv, count = np.zeros(c), np.ones(c), np.array(0)
    for x in _batches(rng, shape):
        F.batch_norm(
            x, rm, rv, training=True, momentum=None, layout=layout,
            num_batches_tracked=count, backend=backend,
        )  # fmt: skip
        module(torch.tensor(to_channels_first(x, layout)))
    assert int(count) == int(module.num_batches_tracked) == STEPS
    np.testing.assert_allclose(rm, module.running_mean.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rv, module.running_var.numpy(), rtol=1e-12, atol=1e-12)


def test_momentum_none_needs_a_counter(rng):
    rm, rv = np.zeros(2), np.ones(2)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        F.batch_norm(rng.standard_normal((4, 2)), rm, rv, training=True, momentum=None, layout="NC")
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)


# --------------------------------------------------------------------------- textbooks
# Each update is the textbook's own line, transcribed with its own variable names.


def cs231n_update(running_mean, running_var, x, momentum):
    # cs231n assignment 2, batchnorm_forward (x is (N, D)):
    sample_mean = x.mean(axis=0)
    sample_var = x.var(axis=0)
    running_mean = momentum * running_mean + (1 - momentum) * sample_mean
    running_var = momentum * running_var + (1 - momentum) * sample_var
    return running_mean, running_var


def d2l_update(moving_mean, moving_var, X, momentum):
    # d2l.ai, batch_norm (X is (N, C, H, W) or (N, C)):
    axes = (0,) if X.ndim == 2 else (0, 2, 3)
    mean = X.mean(axis=axes)
    var = ((X - mean.reshape((1, -1) + (1,) * (X.ndim - 2))) ** 2).mean(axis=axes)
    moving_mean = (1.0 - momentum) * mean + momentum * moving_mean
    moving_var = (1.0 - momentum) * var + momentum * moving_var
    return moving_mean, moving_var


def keras_update(moving_mean, moving_variance, inputs, momentum):
    # keras BatchNormalization: moving.assign_sub((moving - value) * (1 - momentum))
    axes = tuple(a for a in range(inputs.ndim) if a != inputs.ndim - 1)  # channels last
    mean, variance = inputs.mean(axis=axes), inputs.var(axis=axes)
    moving_mean = moving_mean - (moving_mean - mean) * (1 - momentum)
    moving_variance = moving_variance - (moving_variance - variance) * (1 - momentum)
    return moving_mean, moving_variance


def flax_update(ra_mean, ra_var, x, momentum):
    # flax.linen.BatchNorm (feature axis last): var = mean(x²) − mean(x)², biased
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axis=axes)
    var = (x**2).mean(axis=axes) - mean**2
    ra_mean = momentum * ra_mean + (1 - momentum) * mean
    ra_var = momentum * ra_var + (1 - momentum) * var
    return ra_mean, ra_var


# (preset, update, layout the textbook uses, its default momentum)
TEXTBOOKS = [
    ("cs231n", cs231n_update, "NC", 0.9),
    ("d2l", d2l_update, "NCHW", 0.9),
    ("d2l", d2l_update, "NC", 0.9),
    ("keras", keras_update, "NHWC", 0.99),
    ("keras", keras_update, "NLC", 0.99),
    ("flax", flax_update, "NHWC", 0.99),
]


@pytest.mark.parametrize("preset,update,layout,default_momentum", TEXTBOOKS)
@pytest.mark.parametrize("explicit_momentum", [False, True])
def test_textbook_running_stats_over_20_steps(
    rng, preset, update, layout, default_momentum, explicit_momentum, backend
):
    shape = SHAPES[layout]
    c = channels(shape, layout)
    momentum = 0.7 if explicit_momentum else default_momentum
    kw = {"momentum": momentum} if explicit_momentum else {}  # else: the preset's default
    rm, rv = np.zeros(c), np.ones(c)
    ref_m, ref_v = np.zeros(c), np.ones(c)
    for x in _batches(rng, shape):
        F.batch_norm_forward(
            x, None, None, training=True, running_mean=rm, running_var=rv, layout=layout,
            convention=preset, backend=backend, **kw,
        )  # fmt: skip
        ref_m, ref_v = update(ref_m, ref_v, x, momentum)
    np.testing.assert_allclose(rm, ref_m, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(rv, ref_v, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("layout", ["NC", "NCHW"])
def test_inference_is_the_textbook_formula(rng, layout, backend):
    shape = SHAPES[layout]
    c = channels(shape, layout)
    x = rng.standard_normal(shape) * 3
    g, b = random_affine(rng, c)
    rm, rv = rng.standard_normal(c), rng.uniform(0.1, 3, c)
    y, _ = F.batch_norm_forward(
        x, g, b, training=False, running_mean=rm, running_var=rv, eps=1e-3, layout=layout,
        backend=backend,
    )  # fmt: skip
    bc = (1, -1) + (1,) * (x.ndim - 2)
    expected = (x - rm.reshape(bc)) / np.sqrt(rv.reshape(bc) + 1e-3) * g.reshape(bc) + b.reshape(bc)
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- non-finite batches


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("layout", ["NC", "NHWC"])
def test_nonfinite_batch_warns_and_leaves_buffers(rng, bad, layout, backend):
    shape = SHAPES[layout]
    c = channels(shape, layout)
    x = rng.standard_normal(shape)
    x.flat[3] = bad
    rm, rv, count = rng.standard_normal(c), rng.uniform(0.5, 2, c), np.array(7)
    before = (rm.copy(), rv.copy())
    with pytest.warns(NonFiniteBatchWarning, match="running statistics were left unchanged"):
        y, _ = F.batch_norm_forward(
            x, None, None, training=True, running_mean=rm, running_var=rv, layout=layout,
            num_batches_tracked=count, backend=backend,
        )  # fmt: skip
    np.testing.assert_array_equal(rm, before[0])
    np.testing.assert_array_equal(rv, before[1])
    assert int(count) == 7
    assert not np.isfinite(y).all()  # the output is returned, not hidden


@pytest.mark.parametrize("momentum", [0.1, None])
def test_nonfinite_batch_raises_on_request(rng, momentum, backend):
    x = rng.standard_normal((4, 3, 2, 2))
    x[1, 2, 0, 1] = np.nan
    rm, rv, count = rng.standard_normal(3), rng.uniform(0.5, 2, 3), np.array(2)
    before = (rm.copy(), rv.copy())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning in raise mode: an exception instead
        with pytest.raises(NonFiniteError, match="NaN or Inf"):
            F.batch_norm_forward(
                x, None, None, training=True, running_mean=rm, running_var=rv,
                momentum=momentum, num_batches_tracked=count, on_nonfinite="raise",
                backend=backend,
            )  # fmt: skip
    np.testing.assert_array_equal(rm, before[0])
    np.testing.assert_array_equal(rv, before[1])
    assert int(count) == 2


def test_finite_batch_after_a_bad_one_updates_normally(rng):
    """A skipped batch does not poison later ones (and does not count for momentum=None)."""
    rm, rv, count = np.zeros(2), np.ones(2), np.array(0)
    good = rng.standard_normal((5, 2))
    bad = good.copy()
    bad[0, 0] = np.inf
    with pytest.warns(NonFiniteBatchWarning):
        F.batch_norm(bad, rm, rv, training=True, momentum=None, layout="NC",
                     num_batches_tracked=count)  # fmt: skip
    F.batch_norm(good, rm, rv, training=True, momentum=None, layout="NC", num_batches_tracked=count)
    assert int(count) == 1
    np.testing.assert_allclose(rm, good.mean(0), rtol=1e-14)
    np.testing.assert_allclose(rv, good.var(0, ddof=1), rtol=1e-14)
