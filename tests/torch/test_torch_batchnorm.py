"""bnlab.torch.BatchNorm1d/2d vs torch.nn.BatchNorm1d/2d: values, gradients, buffers, errors."""

from __future__ import annotations

import copy
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import bnlab.torch as bt  # noqa: E402
from bnlab.errors import NonFiniteBatchWarning  # noqa: E402
from bnlab.torch import functional as BF  # noqa: E402

FORMATS = {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}


@pytest.fixture(autouse=True)
def _kernels_on_small_inputs():
    """These tests compare bnlab's kernels with PyTorch on small tensors, below the size from
    which bnlab takes its kernels by default: take them whenever they can run."""
    with bt.dispatch.kernel_route("always"):
        yield


def _pair(cls_torch, cls_bnlab, c, dtype=torch.float32, **kw):
    """A torch module with random affine parameters/statistics and a bnlab twin with its state."""
    ref = cls_torch(c, dtype=dtype, **kw)
    with torch.no_grad():
        for t in (ref.weight, ref.bias):
            if t is not None:
                t.uniform_(0.5, 1.5)
        if ref.running_mean is not None:
            ref.running_mean.uniform_(-1, 1)
            ref.running_var.uniform_(0.5, 2)
    ours = cls_bnlab(c, dtype=dtype, **kw)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _run(module, x, dy):
    x = x.detach().clone().requires_grad_()
    y = module(x)
    y.backward(dy)
    return y, x.grad


def _assert_same(ref, ours, x, dy, tol):
    """Outputs, input/parameter gradients and every buffer agree; returns our output."""
    y_ref, dx_ref = _run(ref, x, dy)
    y, dx = _run(ours, x, dy)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(dx, dx_ref, **tol)
    for (name, p_ref), p in zip(ref.named_parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, **tol, msg=f"grad of {name}")
    for (name, b_ref), b in zip(ref.named_buffers(), ours.buffers(), strict=True):
        torch.testing.assert_close(b, b_ref, **tol, msg=f"buffer {name}")
    return y


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
def test_batchnorm2d_matches_torch(fmt, dtype, training):
    g = torch.Generator().manual_seed(0)
    ref, ours = _pair(nn.BatchNorm2d, bt.BatchNorm2d, 5, dtype)
    ref.train(training), ours.train(training)
    x = (torch.randn(4, 5, 6, 3, generator=g, dtype=dtype) * 3 + 2).to(memory_format=FORMATS[fmt])
    dy = torch.randn(4, 5, 6, 3, generator=g, dtype=dtype)  # random upstream gradient
    for _ in range(3):  # several steps: the running statistics keep agreeing
        y = _assert_same(ref, ours, x, dy, TOL[dtype])
    assert y.is_contiguous(memory_format=FORMATS[fmt])
    assert type(y.grad_fn).__name__ == "KernelBatchNormBackward"  # the fast path was exercised


@pytest.mark.parametrize("shape", [(7, 4), (5, 4, 6)])
@pytest.mark.parametrize("training", [True, False])
def test_batchnorm1d_matches_torch(shape, training):
    g = torch.Generator().manual_seed(1)
    ref, ours = _pair(nn.BatchNorm1d, bt.BatchNorm1d, 4, torch.float64)
    ref.train(training), ours.train(training)
    x, dy = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g)
    _assert_same(ref, ours, x, dy.double(), TOL[torch.float64])


def test_batchnorm1d_channels_last_3d_uses_nlc_layout():
    g = torch.Generator().manual_seed(2)
    ref, ours = _pair(nn.BatchNorm1d, bt.BatchNorm1d, 4, torch.float64)
    x = torch.randn(3, 6, 4, generator=g, dtype=torch.float64).transpose(1, 2)  # (N, C, L) view
    assert BF.kernel_layout(x) == "NLC"
    y = _assert_same(ref, ours, x, torch.randn(3, 4, 6, generator=g).double(), TOL[torch.float64])
    assert type(y.grad_fn).__name__ == "KernelBatchNormBackward"


@pytest.mark.parametrize(
    "kw",
    [
        dict(momentum=None),
        dict(momentum=0.3),
        dict(affine=False),
        dict(bias=False),
        dict(track_running_stats=False),
        dict(affine=False, track_running_stats=False),
        dict(eps=1e-2),
    ],
    ids=str,
)
@pytest.mark.parametrize("training", [True, False])
def test_constructor_options_match_torch(kw, training):
    g = torch.Generator().manual_seed(3)
    ref, ours = _pair(nn.BatchNorm2d, bt.BatchNorm2d, 3, torch.float64, **kw)
    ref.train(training), ours.train(training)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert repr(ours).removeprefix("BatchNorm2d") == repr(ref).removeprefix("BatchNorm2d")
    for step in range(4):  # momentum=None: the cumulative average over num_batches_tracked
        x = torch.randn(5, 3, 2, 3, generator=g, dtype=torch.float64) + step
        dy = torch.randn(5, 3, 2, 3, generator=g, dtype=torch.float64)
        _assert_same(ref, ours, x, dy, TOL[torch.float64])


def test_second_use_in_the_same_graph():
    g = torch.Generator().manual_seed(4)
    ref, ours = _pair(nn.BatchNorm2d, bt.BatchNorm2d, 3, torch.float64)
    x = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64)
    dy = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64)
    grads = []
    for m in (ref, ours):
        xi = x.clone().requires_grad_()
        m(m(xi) * 2 + 1).backward(dy)  # the module twice in one graph
        grads.append((xi.grad, m.weight.grad, m.bias.grad))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, **TOL[torch.float64])
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    assert int(ours.num_batches_tracked) == 2


# --------------------------------------------------------------------------- gradients


def _gradcheck_inputs(shape, memory_format=torch.contiguous_format, seed=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(memory_format=memory_format)
    w = torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(shape[1], generator=g, dtype=torch.float64)
    return [t.requires_grad_() for t in (x, w, b)]


def _stats(c):
    return torch.rand(c, dtype=torch.float64) - 0.5, torch.rand(c, dtype=torch.float64) + 0.5


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("training", [True, False])
def test_fast_path_gradcheck_and_gradgradcheck(fmt, training):
    x, w, b = _gradcheck_inputs((3, 2, 2, 3), FORMATS[fmt])
    rm, rv = _stats(2)
    assert BF.kernel_layout(x, w, b, rm, rv) is not None

    def f(x, w, b):  # buffers only read in eval; None in training so gradcheck calls are pure
        if training:
            return BF.batch_norm(x, None, None, w, b, training=True)
        return BF.batch_norm(x, rm, rv, w, b, training=False)

    assert type(f(x, w, b).grad_fn).__name__ == "KernelBatchNormBackward"
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_reference_path_gradcheck_and_gradgradcheck():
    x, w, b = _gradcheck_inputs((4, 3, 2, 2))
    x_strided = x.transpose(0, 2)  # (2, 3, 4, 2): neither contiguous nor channels_last
    assert BF.kernel_layout(x_strided) is None

    def f(x, w, b):
        return BF.batch_norm(x.transpose(0, 2), None, None, w, b, training=True)

    assert type(f(x, w, b).grad_fn).__name__ != "KernelBatchNormBackward"
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("training", [True, False])
def test_fast_path_equals_reference_and_closed_form(training):
    """The three implementations of the same formulas agree in float64: the kernel path, the
    torch-ops reference (autograd) and the explicit closed-form torch backward."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(6, 4, 3, 2, generator=g, dtype=torch.float64) * 5 + 3
    dy = torch.randn(6, 4, 3, 2, generator=g, dtype=torch.float64)
    w, b = torch.rand(4, dtype=torch.float64) + 0.5, torch.randn(4, dtype=torch.float64)
    rm, rv = _stats(4)
    results = []
    for fn in (BF.batch_norm, BF.batch_norm_reference):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        rms, rvs = rm.clone(), rv.clone()
        if fn is BF.batch_norm:
            y = fn(xs, rms, rvs, ws, bs, training, 0.1, 1e-5)
        else:
            y = fn(xs, rms, rvs, ws, bs, training, 0.1, 1e-5, None)
        y.backward(dy)
        results.append((y, xs.grad, ws.grad, bs.grad, rms, rvs))
    for a, c in zip(*results, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)
    closed = BF.batch_norm_backward_reference(dy, x, w, 1e-5, training, rm, rv)
    for a, c in zip(closed, results[1][1:4], strict=True):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


def test_numpy_and_default_backends_agree():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, 3, 4, 4, generator=g).to(memory_format=torch.channels_last)
    dy = torch.randn(5, 3, 4, 4, generator=g)
    outs = []
    for backend in ("numpy", None):
        m = bt.BatchNorm2d(3)
        m.backend = backend
        y, dx = _run(m, x, dy)
        outs.append((y, dx, m.weight.grad, m.running_var))
    for a, c in zip(*outs, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)


def test_large_mean_does_not_cancel():
    """Flax's test: a 1e6 offset must not destroy the variance (float64)."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(8, 2, 3, 3, generator=g, dtype=torch.float64)
    m = bt.BatchNorm2d(2, dtype=torch.float64)
    torch.testing.assert_close(m(x + 1e6), m(x), rtol=0, atol=1e-9)


# --------------------------------------------------------------------------- zero-copy


def test_fast_path_is_zero_copy(monkeypatch):
    from bnlab.torch import _kernel

    seen = {}
    real_forward, real_update = _kernel.batch_norm_forward, _kernel.update_running_stats

    def spy_forward(x, gamma, beta, **kw):
        seen.update(x=x, out=kw["out"], layout=kw["layout"])
        return real_forward(x, gamma, beta, **kw)

    def spy_update(running_mean, *args, **kw):
        seen.update(rm=running_mean)
        return real_update(running_mean, *args, **kw)

    monkeypatch.setattr(_kernel, "batch_norm_forward", spy_forward)
    monkeypatch.setattr(_kernel, "update_running_stats", spy_update)
    m = bt.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)
    ptr = m.running_mean.data_ptr()
    y = m(x)
    assert seen["layout"] == "NLC"
    assert seen["x"].ctypes.data == x.data_ptr()
    assert seen["out"].ctypes.data == y.data_ptr()
    assert seen["rm"].ctypes.data == m.running_mean.data_ptr() == ptr
    assert not torch.equal(m.running_mean, torch.zeros(3))  # updated in place, through the view


def test_inplace_edit_of_input_after_forward_is_caught():
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    xx = x * 1
    y = bt.BatchNorm2d(3)(xx)
    xx.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


# --------------------------------------------------------------------------- special inputs


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
def test_low_precision_input_float32_statistics(dtype, training):
    g = torch.Generator().manual_seed(9)
    ref, ours = _pair(nn.BatchNorm2d, bt.BatchNorm2d, 3)
    ref.train(training), ours.train(training)
    x = torch.randn(4, 3, 5, 5, generator=g).to(dtype)
    dy = torch.randn(4, 3, 5, 5, generator=g).to(dtype)
    y = _assert_same(ref, ours, x, dy, dict(rtol=2e-2, atol=2e-2))
    assert y.dtype == dtype and ours.running_mean.dtype == torch.float32


def test_zero_size_batch_returns_empty_and_leaves_statistics():
    m = bt.BatchNorm2d(3)
    before = copy.deepcopy(m.state_dict())
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    y = m(x)
    assert y.shape == (0, 3, 4, 4)
    y.sum().backward()
    assert torch.equal(m.weight.grad, torch.zeros(3)) and x.grad.shape == x.shape
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k  # num_batches_tracked too (see docs/torch.md)


@pytest.mark.parametrize("memory_format", list(FORMATS.values()))
def test_nonfinite_batch_warns_and_leaves_buffers(memory_format):
    m = bt.BatchNorm2d(3)
    m(torch.randn(4, 3, 2, 2))
    before = copy.deepcopy(m.state_dict())
    x = torch.randn(4, 3, 2, 2).to(memory_format=memory_format)
    x[1, 2, 0, 1] = float("nan")
    with pytest.warns(NonFiniteBatchWarning):
        y = m(x)
    assert torch.isnan(y[:, 2]).all() and torch.isfinite(y[:, :2]).all()
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_nonfinite_batch_reference_path_warns_and_leaves_buffers():
    m = bt.BatchNorm2d(3).half()
    before = copy.deepcopy(m.state_dict())
    x = torch.randn(4, 3, 2, 2).half()
    x[0, 0, 0, 0] = float("inf")
    with pytest.warns(NonFiniteBatchWarning):
        m(x)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def _bad_inputs():
    return {
        "3d input": (dict(), True, torch.randn(2, 3, 4)),
        "one value per channel": (dict(), True, torch.randn(1, 3, 1, 1)),
        "channel mismatch": (dict(), True, torch.randn(2, 4, 3, 3)),
        "channel mismatch eval": (dict(), False, torch.randn(2, 4, 3, 3)),
        "integer input": (dict(), True, torch.ones(2, 3, 2, 2, dtype=torch.int64)),
        "float64 into float32 module": (dict(), True, torch.randn(2, 3, 2, 2).double()),
        "float32 into float64 module": (dict(dtype=torch.float64), True, torch.randn(2, 3, 2, 2)),
        "one value, no stats": (dict(track_running_stats=False), False, torch.randn(1, 3, 1, 1)),
    }


@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_bad_input_raises_like_torch_and_leaves_state(case):
    kw, training, x = _bad_inputs()[case]
    ref, ours = nn.BatchNorm2d(3, **kw), bt.BatchNorm2d(3, **kw)
    ref.train(training), ours.train(training)
    before = copy.deepcopy(ours.state_dict())
    with pytest.raises(Exception) as want:
        ref(x)
    with pytest.raises(type(want.value)) as got:
        ours(x)
    assert str(got.value) == str(want.value)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bad_momentum_and_missing_counter_are_clear_errors():
    x = torch.randn(4, 3, 2, 2)
    with pytest.raises(TypeError, match="momentum"):
        BF.batch_norm(x, torch.zeros(3), torch.ones(3), training=True, momentum="0.1")
    with pytest.raises(ValueError, match="num_batches_tracked"):
        BF.batch_norm(x, torch.zeros(3), torch.ones(3), training=True, momentum=None)


# --------------------------------------------------------------------------- state_dict, convert


def test_state_dict_loads_both_ways():
    ref, ours = _pair(nn.BatchNorm2d, bt.BatchNorm2d, 4)
    ref(torch.randn(3, 4, 2, 2))
    ours.load_state_dict(ref.state_dict())
    back = nn.BatchNorm2d(4)
    back.load_state_dict(ours.state_dict())
    for sd in (ours.state_dict(), back.state_dict()):
        assert list(sd) == list(ref.state_dict())
        for k, v in sd.items():
            assert torch.equal(v, ref.state_dict()[k]), k


def _small_cnn():
    torch.manual_seed(10)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 4, 6), nn.BatchNorm1d(6, momentum=None)),
        nn.Linear(6, 2),
    )


@pytest.mark.parametrize("training", [True, False])
def test_convert_and_revert_keep_outputs(training):
    model = _small_cnn()
    model(torch.randn(8, 1, 6, 6))  # non-trivial running statistics
    model.train(training)
    x = torch.randn(5, 1, 6, 6)
    expected = copy.deepcopy(model)(x)
    converted = bt.convert(copy.deepcopy(model))
    kinds = [type(m) for m in converted.modules()]
    assert bt.BatchNorm2d in kinds and bt.BatchNorm1d in kinds
    assert all(type(m) not in (nn.BatchNorm1d, nn.BatchNorm2d) for m in converted.modules())
    torch.testing.assert_close(converted(x), expected, rtol=1e-4, atol=1e-5)
    assert converted[3][2].momentum is None and converted.training == training
    reverted = bt.revert(copy.deepcopy(converted))
    assert {type(m) for m in reverted.modules()} == {type(m) for m in model.modules()}
    torch.testing.assert_close(reverted(x), expected, rtol=1e-4, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(reverted.state_dict()) == list(model.state_dict())


def test_import_bnlab_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, bnlab, bnlab.functional; assert 'torch' not in sys.modules, 'torch loaded'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_torch_gives_install_hint():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\n"
        "try:\n    import bnlab.torch\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install bnlab[torch]" in out.stdout


@pytest.mark.parametrize(
    "kw, training",
    [(dict(track_running_stats=False), True), (dict(), False)],
    ids=["batch", "eval"],
)
def test_torch_func_transforms_match_torch(kw, training):
    """torch.func.grad/jvp/vmap run the torch-ops path (custom Functions do not compose)."""
    from torch.func import grad, jvp, vmap

    g = torch.Generator().manual_seed(11)
    ref, ours = _pair(nn.BatchNorm2d, bt.BatchNorm2d, 3, torch.float64, **kw)
    ref.train(training), ours.train(training)
    x = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    t = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    xs = torch.randn(5, 4, 3, 2, 2, generator=g, dtype=torch.float64)
    for transform in (
        lambda m: grad(lambda x: (m(x) * t).sum() ** 2)(x),
        lambda m: jvp(m, (x,), (t,))[1],
        lambda m: vmap(m)(xs),
    ):
        torch.testing.assert_close(transform(ours), transform(ref), **TOL[torch.float64])


@settings(max_examples=25)
@given(
    n=st.integers(1, 5),
    c=st.integers(1, 4),
    h=st.integers(1, 4),
    w=st.integers(1, 4),
    channels_last=st.booleans(),
    training=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_match_torch(n, c, h, w, channels_last, training, seed):
    """Any shape and memory format, incl. ambiguous strides (C = 1 or H = W = 1), in float64."""
    g = torch.Generator().manual_seed(seed)
    ref, ours = _pair(nn.BatchNorm2d, bt.BatchNorm2d, c, torch.float64)
    ref.train(training), ours.train(training)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64).to(memory_format=fmt)
    dy = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    if training and n * h * w == 1:
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            ours(x)
        return
    y = _assert_same(ref, ours, x, dy, TOL[torch.float64])
    assert y.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("training", [True, False])
def test_reference_path_matches_torch_on_strided_input(training):
    """Non-contiguous input takes the torch-ops path; float64 values, grads, buffers vs torch."""
    g = torch.Generator().manual_seed(12)
    ref, ours = _pair(nn.BatchNorm2d, bt.BatchNorm2d, 3, torch.float64)
    ref.train(training), ours.train(training)
    x = torch.randn(4, 3, 5, 6, generator=g, dtype=torch.float64).transpose(2, 3)
    assert BF.kernel_layout(x) is None
    dy = torch.randn(4, 3, 6, 5, generator=g, dtype=torch.float64)
    for _ in range(2):
        y = _assert_same(ref, ours, x, dy, TOL[torch.float64])
    assert type(y.grad_fn).__name__ != "KernelBatchNormBackward"
