"""Aliasing and the cache contract: whatever a caller does with ``out=``/``dx=`` and with x after
the forward, a backward returns exactly the gradients of the forward's x, or raises
:class:`~bnlab.errors.InputModifiedError`; never wrong numbers. Every function that keeps x or
takes an output buffer, on both backends, and the kernels' own API."""

from __future__ import annotations

import numpy as np
import pytest
from fn_support import BACKENDS
from hypothesis import given, settings
from hypothesis import strategies as st

from bnlab import kernels
from bnlab.errors import InputModifiedError
from bnlab.functional import (
    batch_norm_backward,
    batch_norm_backward_graph,
    batch_norm_forward,
    batch_renorm_backward,
    batch_renorm_forward,
    ghost_batch_norm_backward,
    ghost_batch_norm_forward,
    group_norm_backward,
    group_norm_forward,
    instance_norm_backward,
    instance_norm_forward,
    layer_norm_backward,
    layer_norm_forward,
)

SHAPE = (6, 4, 5, 7)
C = SHAPE[1]
RNG = np.random.default_rng(17)
GAMMA, BETA = RNG.standard_normal(C), RNG.standard_normal(C)


def _x():
    return 0.5 + np.random.default_rng(3).standard_normal(SHAPE)


def _dy():
    return np.random.default_rng(4).standard_normal(SHAPE)


def _bn(training):
    def forward(x, backend, out=None):
        return batch_norm_forward(x, GAMMA, BETA, training=training, running_mean=np.zeros(C),
                                  running_var=np.ones(C), backend=backend, out=out)  # fmt: skip

    return forward, batch_norm_backward


FAMILY = {  # name -> (forward(x, backend), backward(dout, cache))
    "batch_norm train": _bn(True),
    "batch_norm eval": _bn(False),
    "batch_norm graph": (_bn(True)[0], batch_norm_backward_graph),
    "layer_norm": (
        lambda x, backend: layer_norm_forward(x, SHAPE[1:], None, None, backend=backend),
        layer_norm_backward,
    ),
    "group_norm": (
        lambda x, backend: group_norm_forward(x, 2, GAMMA, BETA, backend=backend),
        group_norm_backward,
    ),
    "instance_norm": (
        lambda x, backend: instance_norm_forward(x, GAMMA, BETA, backend=backend),
        instance_norm_backward,
    ),
    "batch_renorm": (
        lambda x, backend: batch_renorm_forward(
            x,
            GAMMA,
            BETA,
            training=True,
            running_mean=np.zeros(C),
            running_var=np.ones(C),
            backend=backend,
        ),  # fmt: skip
        batch_renorm_backward,
    ),
    "ghost_batch_norm": (
        lambda x, backend: ghost_batch_norm_forward(
            x, GAMMA, BETA, training=True, virtual_batch_size=2, backend=backend
        ),
        ghost_batch_norm_backward,
    ),
}


def _relu(x):
    np.maximum(x, 0.0, out=x)


def _refill(x):
    x[...] = np.random.default_rng(99).standard_normal(x.shape)


def _add(x):
    x += 1.0


def _scale(x):
    x *= 3.0


MODIFICATIONS = {"+=": _add, "*=": _scale, "in-place ReLU": _relu, "refill": _refill}


def _gradients_or_refusal(forward, backward, backend, modify):
    """The backward's gradients after ``modify(x)`` (None when it refused), and the gradients of
    the same forward with x left alone."""
    x = _x()
    _, cache = forward(x, backend)
    modify(x)
    try:
        got = backward(_dy(), cache)
    except InputModifiedError as e:
        assert "modified after the forward pass" in str(e) and "copy" in str(e)
        got = None
    _, clean = forward(_x(), backend)
    return got, backward(_dy(), clean)


def _assert_same(got, want):
    for g, w in zip(got, want, strict=True):
        if w is None:
            assert g is None
        else:
            np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", sorted(MODIFICATIONS))
@pytest.mark.parametrize("name", sorted(FAMILY))
def test_a_modified_x_gives_the_exact_gradients_or_a_clear_error(name, how, backend):
    forward, backward = FAMILY[name]
    got, want = _gradients_or_refusal(forward, backward, backend, MODIFICATIONS[how])
    if got is not None:
        _assert_same(got, want)


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_the_kernels_refuse_a_modified_x(name):
    """The numba backend keeps x by reference: a modified x is refused, not used."""
    forward, backward = FAMILY[name]
    got, _ = _gradients_or_refusal(forward, backward, "numba", _add)
    assert got is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(FAMILY))
def test_out_x_in_a_second_call_gives_the_exact_gradients_or_a_clear_error(name, backend):
    forward, backward = FAMILY[name]

    def second_call_into_x(x):
        batch_norm_forward(x, None, None, training=True, backend=backend, out=x)

    got, want = _gradients_or_refusal(forward, backward, backend, second_call_into_x)
    if got is not None:
        _assert_same(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("overlap", ["out=x", "out overlaps x", "out=x[::-1] view"])
def test_batch_norm_out_sharing_memory_with_x_gives_the_unshared_result(backend, training, overlap):
    forward, backward = _bn(training)
    y_want, cache = forward(_x(), backend)
    grads_want = backward(_dy(), cache)
    if overlap == "out=x":
        x = _x()
        out = x
    elif overlap == "out overlaps x":  # x and out are shifted windows of one buffer
        buf = np.concatenate([_x().reshape(-1), np.zeros(C * 35)])
        x = buf[: _x().size].reshape(SHAPE)
        out = buf[C * 35 :].reshape(SHAPE)
    else:
        x = _x()
        out = x[::-1]  # the same memory, another order
    y, cache = forward(x, backend, out=out)
    assert y is out
    np.testing.assert_array_equal(y, y_want)
    _assert_same(backward(_dy(), cache), grads_want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("target", ["dout", "x", "dout overlap"])
def test_batch_norm_dx_sharing_memory_with_an_input_gives_the_unshared_result(backend, target):
    forward, _ = _bn(True)
    _, cache = forward(_x(), backend)
    want = batch_norm_backward(_dy(), cache)
    x = _x()
    _, cache = forward(x, backend)
    dy = _dy()
    if target == "dout":
        out = dy
    elif target == "x":
        out = x
    else:
        buf = np.concatenate([np.zeros(7), dy.reshape(-1)])
        dy = buf[7:].reshape(SHAPE)
        out = buf[:-7].reshape(SHAPE)
    got = batch_norm_backward(dy, cache, out=out)
    assert got[0] is out
    _assert_same(got, want)


def test_a_private_copy_needs_no_fingerprint():
    """Inputs the kernels stage through a copy (float16, byte-swapped, strided) are kept as that
    copy: modifying the caller's x afterwards changes nothing."""
    for x in (_x().astype(np.float16), _x().astype(">f8"), np.asfortranarray(_x())):
        dy = _dy().astype(x.dtype)
        _, cache = batch_norm_forward(x, None, None, training=True, backend="numba")
        assert cache.fingerprint is None
        want = batch_norm_backward(dy, cache)
        x[...] = 0
        _assert_same(batch_norm_backward(dy, cache), want)


# --------------------------------------------------------------------------- the kernel API

X3 = np.random.default_rng(5).standard_normal((4, 3, 11))
DY3 = np.random.default_rng(6).standard_normal(X3.shape)
W3 = np.random.default_rng(7).standard_normal(3)


def _kernel_calls():
    """name -> (call(x, dy, alias) -> outputs, which argument the alias replaces)."""

    def train_forward(x, dy, out):
        return kernels.bn_train_forward(x, W3, W3, 1e-5, False, out=out)

    def eval_forward(x, dy, out):
        return (kernels.bn_eval_forward(x, W3, W3, False, out=out),)

    def backward(x, dy, dx):
        _, mean, var = kernels.bn_train_forward(x, W3, W3, 1e-5, False)
        return kernels.bn_backward(dy, x, mean, 1 / np.sqrt(var + 1e-5), W3, False, dx=dx)

    def eval_backward(x, dy, dx):
        return kernels.bn_eval_backward(dy, x, W3 * 0, W3 * 0 + 2, W3, False, dx=dx)

    def ln(x, dy, out):
        return kernels.ln_forward(x.reshape(12, 11), None, None, 1e-5, out=out)

    def ln_backward(x, dy, dx):
        x2, dy2 = x.reshape(12, 11), dy.reshape(12, 11)
        _, mean, rstd = kernels.ln_forward(x2, None, None, 1e-5)
        return kernels.ln_backward(dy2, x2, mean, rstd, None, dx=dx)

    def gn(x, dy, out):
        return kernels.gn_forward(x, 3, None, None, 1e-5, out=out)

    def gn_backward(x, dy, dx):
        _, mean, rstd = kernels.gn_forward(x, 3, None, None, 1e-5)
        return kernels.gn_backward(dy, x, mean, rstd, None, 3, dx=dx)

    return {
        "bn_train_forward": (train_forward, "x"),
        "bn_eval_forward": (eval_forward, "x"),
        "bn_backward dx=dy": (backward, "dy"),
        "bn_backward dx=x": (backward, "x"),
        "bn_eval_backward dx=dy": (eval_backward, "dy"),
        "ln_forward": (ln, "x"),
        "ln_backward dx=dy": (ln_backward, "dy"),
        "gn_forward": (gn, "x"),
        "gn_backward dx=dy": (gn_backward, "dy"),
    }


@pytest.mark.parametrize("name", sorted(_kernel_calls()))
def test_kernel_outputs_sharing_memory_with_an_input_give_the_unshared_result(name):
    call, aliased = _kernel_calls()[name]
    x, dy = X3.copy(), DY3.copy()
    want = [np.array(a) for a in call(x, dy, None)]
    x, dy = X3.copy(), DY3.copy()
    target = x if aliased == "x" else dy
    shape = want[0].shape
    got = call(x, dy, target.reshape(shape))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


# --------------------------------------------------------------------------- no false alarms


@settings(max_examples=60, deadline=None)
@given(
    shape=st.tuples(st.integers(2, 5), st.integers(1, 4), st.integers(1, 6), st.integers(1, 9)),
    dtype=st.sampled_from([np.float32, np.float64]),
    name=st.sampled_from(sorted(FAMILY)),
    seed=st.integers(0, 2**32 - 1),
)
def test_an_unmodified_x_never_raises(shape, dtype, name, seed):
    """Forward, unrelated work (other arrays written, x read), backward: no error."""
    global SHAPE, C, GAMMA, BETA
    saved = SHAPE, C, GAMMA, BETA
    c = shape[1] * 2
    SHAPE, C = (shape[0] * 2, c, *shape[2:]), c
    GAMMA, BETA = np.ones(c), np.zeros(c)
    try:
        rng = np.random.default_rng(seed)
        x = rng.standard_normal(SHAPE).astype(dtype)
        forward, backward = FAMILY[name]
        for backend in BACKENDS:
            _, cache = forward(x, backend)
            other = x * 2  # reading x, writing other arrays
            other += 1
            backward(rng.standard_normal(SHAPE).astype(dtype), cache)
            backward(rng.standard_normal(SHAPE).astype(dtype), cache)  # twice: still the same x
    finally:
        SHAPE, C, GAMMA, BETA = saved
