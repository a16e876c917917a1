"""Module bookkeeping: registration, traversal, modes, state_dict keys and strict loading."""

from __future__ import annotations

import numpy as np
import pytest

from bnlab import nn
from bnlab.errors import DTypeError, ShapeError
from bnlab.models import lenet, lenet_bn


def test_lenet_bn_state_dict_keys_match_pytorch_sequential():
    torch = pytest.importorskip("torch")
    t = torch.nn
    ref = t.Sequential(
        t.Conv2d(1, 6, 5), t.BatchNorm2d(6), t.Sigmoid(), t.AvgPool2d(2, 2),
        t.Conv2d(6, 16, 5), t.BatchNorm2d(16), t.Sigmoid(), t.AvgPool2d(2, 2), t.Flatten(),
        t.Linear(256, 120), t.BatchNorm1d(120), t.Sigmoid(),
        t.Linear(120, 84), t.BatchNorm1d(84), t.Sigmoid(), t.Linear(84, 10),
    )  # fmt: skip
    ours = lenet_bn(0).state_dict()
    theirs = ref.state_dict()
    assert list(ours) == list(theirs)
    for k, v in theirs.items():
        assert ours[k].shape == tuple(v.shape), k
        assert ours[k].dtype == (np.int64 if "num_batches" in k else np.float32), k


def test_parameters_buffers_children_traversal():
    m = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.BatchNorm1d(4), nn.ReLU()))
    assert [n for n, _ in m.named_parameters()] == ["0.weight", "0.bias", "1.0.weight", "1.0.bias"]
    assert [n for n, _ in m.named_buffers()] == [
        "1.0.running_mean",
        "1.0.running_var",
        "1.0.num_batches_tracked",
    ]
    assert [n for n, _ in m.named_modules()] == ["", "0", "1", "1.0", "1.1"]
    assert [type(c).__name__ for c in m.children()] == ["Linear", "Sequential"]
    assert len(m) == 2 and isinstance(m[-1][0], nn.BatchNorm1d)
    assert isinstance(m[0:1], nn.Sequential) and len(m[0:1]) == 1
    with pytest.raises(IndexError):
        m[2]


def test_shared_parameter_listed_once():
    lin = nn.Linear(2, 2)
    m = nn.Sequential(lin, lin)
    assert len(list(m.parameters())) == 2


def test_train_eval_recursive_and_bn_uses_running_stats():
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    assert m.training and m[1].training
    assert m.eval() is m and not m[1].training
    x = np.random.default_rng(0).standard_normal((8, 3)).astype(np.float32)
    y_eval = m(x)  # running stats are 0/1: y = x W^T + b exactly up to 1/sqrt(1+eps)
    lin = x @ m[0].weight.data.T + m[0].bias.data
    np.testing.assert_allclose(y_eval, lin / np.sqrt(1 + 1e-5), rtol=1e-5, atol=1e-6)
    assert int(m[1].num_batches_tracked) == 0
    m.train()
    m(x)
    assert int(m[1].num_batches_tracked) == 1
    with pytest.raises(TypeError):
        m.train("yes")


def test_zero_grad_and_accumulation():
    lin = nn.Linear(3, 2)
    x = np.ones((4, 3), np.float32)
    dout = np.random.default_rng(1).standard_normal((4, 2)).astype(np.float32)
    lin(x)
    lin.backward(dout)
    g1 = lin.weight.grad.copy()
    lin(x)
    lin.backward(dout)
    np.testing.assert_allclose(lin.weight.grad, 2 * g1, rtol=1e-6)
    lin.zero_grad()
    assert lin.weight.grad is None


def test_state_dict_is_a_copy_and_roundtrips():
    a, b = lenet_bn(0), lenet_bn(1)
    sd = a.state_dict()
    sd["0.weight"][...] = 0
    assert np.abs(a[0].weight.data).sum() > 0
    b.load_state_dict(a.state_dict())
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        np.testing.assert_array_equal(v, w, err_msg=k)


def _snapshot(m):
    return {k: v.copy() for k, v in m.state_dict().items()}


def test_load_state_dict_lists_missing_and_unexpected_and_changes_nothing():
    m = lenet_bn(0)
    before = _snapshot(m)
    bad = lenet_bn(1).state_dict()
    bad["0.weight"] += 1
    del bad["1.running_var"]
    bad["99.weight"] = np.zeros(3, np.float32)
    with pytest.raises(KeyError) as err:
        m.load_state_dict(bad)
    assert "1.running_var" in str(err.value) and "99.weight" in str(err.value)
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    # non-strict: loads what matches and reports the rest
    res = m.load_state_dict(bad, strict=False)
    assert res.missing_keys == ["1.running_var"] and res.unexpected_keys == ["99.weight"]
    np.testing.assert_array_equal(m[0].weight.data, bad["0.weight"])


def test_load_state_dict_shape_mismatch_lists_all_and_changes_nothing():
    m = lenet_bn(0)
    before = _snapshot(m)
    other = lenet(0).state_dict()  # same keys in places, different shapes (and models)
    sd = lenet_bn(1).state_dict()
    sd["0.weight"] = np.zeros((6, 1, 3, 3), np.float32)
    sd["9.weight"] = other["7.weight"]  # (120, 400) instead of (120, 256)
    with pytest.raises(ShapeError) as err:
        m.load_state_dict(sd)
    assert "0.weight" in str(err.value) and "9.weight" in str(err.value)
    assert "(120, 256)" in str(err.value)
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_load_state_dict_rejects_non_finite_and_non_numeric():
    m = nn.Linear(2, 2)
    sd = m.state_dict()
    sd["weight"] = np.full((2, 2), np.nan, np.float32)
    with pytest.raises(ShapeError, match="NaN"):
        m.load_state_dict(sd)
    sd["weight"] = ["a", "b"]
    with pytest.raises(DTypeError, match="weight"):
        m.load_state_dict(sd)


def test_register_buffer_persistent_flag_and_parameter_none():
    m = nn.Module()
    m.register_buffer("kept", np.zeros(2))
    m.register_buffer("scratch", np.zeros(2), persistent=False)
    m.register_parameter("bias", None)
    assert list(m.state_dict()) == ["kept"]
    assert m.bias is None
    m.kept = np.ones(2)
    np.testing.assert_array_equal(m.state_dict()["kept"], np.ones(2))
    with pytest.raises(AttributeError):
        m.nothing  # noqa: B018


def test_to_float64_keeps_counter_dtype():
    m = lenet_bn(0).double()
    assert all(p.dtype == np.float64 for p in m.parameters())
    assert m[1].running_mean.dtype == np.float64
    assert m[1].num_batches_tracked.dtype == np.int64
    with pytest.raises(DTypeError):
        m.to(np.int32)


def test_no_grad_keeps_no_cache_and_backward_says_so():
    lin = nn.Linear(2, 2)
    with nn.no_grad():
        lin(np.ones((1, 2), np.float32))
    with pytest.raises(RuntimeError, match="without a preceding forward"):
        lin.backward(np.ones((1, 2), np.float32))


@pytest.mark.parametrize(
    ("module", "x", "exc", "words"),
    [
        (lambda: nn.Conv2d(3, 4, 3), np.zeros((2, 2, 5, 5), np.float32), ShapeError, "3 channels"),
        (lambda: nn.Conv2d(1, 1, 5), np.zeros((1, 1, 3, 3), np.float32), ShapeError, "too small"),
        (lambda: nn.Conv2d(1, 1, 3), np.zeros((1, 1, 5, 5), np.int64), DTypeError, "floating"),
        (lambda: nn.Linear(4, 2), np.zeros((3, 5), np.float32), ShapeError, "4 features"),
        (lambda: nn.BatchNorm2d(3), np.zeros((2, 3, 4), np.float32), ShapeError, "4-D"),
        (lambda: nn.BatchNorm1d(3), np.zeros((1, 3), np.float32), ValueError, "more than 1"),
        (lambda: nn.AvgPool2d(2), np.zeros((2, 3), np.float32), ShapeError, "4-D"),
        (lambda: nn.GroupNorm(2, 4), np.zeros((2, 3, 4), np.float32), ShapeError, "4 channels"),
    ],
)
def test_bad_inputs_raise_clear_errors(module, x, exc, words):
    with pytest.raises(exc, match=words):
        module()(x)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="groups"):
        nn.Conv2d(3, 4, 3, groups=2)
    with pytest.raises(ValueError, match="in_channels"):
        nn.Conv2d(0, 4, 3)
    with pytest.raises(ValueError, match="num_features"):
        nn.BatchNorm2d(-1)
    with pytest.raises(ValueError, match="momentum"):
        nn.BatchNorm2d(3, momentum=2.0)
    with pytest.raises(TypeError, match="Module"):
        nn.Sequential(nn.ReLU(), "relu")


def test_batchnorm2d_nhwc_layout_matches_nchw():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 3, 5, 6)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    a, b = nn.BatchNorm2d(3), nn.BatchNorm2d(3, layout="NHWC")
    ya = a(x)
    yb = b(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(yb.transpose(0, 3, 1, 2), ya, rtol=1e-5, atol=1e-6)
    dxa = a.backward(dy)
    dxb = b.backward(np.ascontiguousarray(dy.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(dxb.transpose(0, 3, 1, 2), dxa, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(b.weight.grad, a.weight.grad, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(b.running_var, a.running_var, rtol=1e-6)


def test_thread_switch_sets_and_reports_both_pools():
    from bnlab.nn.threads import get_num_threads, set_blas_threads, set_num_threads

    numba_before, blas_before = get_num_threads()
    try:
        set_num_threads(1)
        nb, blas = get_num_threads()
        assert nb in (None, 1) and blas in (None, 1)
    finally:
        if numba_before is not None:
            import numba

            numba.set_num_threads(numba_before)
        if blas_before is not None:
            set_blas_threads(blas_before)
    with pytest.raises(ValueError, match="threads"):
        set_num_threads(0)


def test_float16_batchnorm_keeps_float32_running_statistics():
    m = nn.BatchNorm2d(2, dtype=np.float16)
    x = np.concatenate(
        [np.full((4, 2, 2, 2), -300, np.float16), np.full((4, 2, 2, 2), 300, np.float16)]
    )
    m(x)  # batch variance 90000 > 65504, the float16 maximum
    assert m.running_var.dtype == np.float32 and np.isfinite(m.running_var).all()
    assert m.to(np.float16).running_var.dtype == np.float32
