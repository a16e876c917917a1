"""The batch-norm behaviours PyTorch's ``test/test_nn.py`` checks for ``torch.nn``, checked for
bnlab's classes and ``bnlab.torch.functional.batch_norm`` (written for bnlab; PyTorch's tests were
read to learn what they check). Each runs on both routes: PyTorch's op (``auto``: these inputs are
small) and bnlab's kernels (``always``, wherever they can run)."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
import torch.autograd.forward_ad as fwAD  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils.fusion import (  # noqa: E402
    fuse_conv_bn_eval,
    fuse_conv_bn_weights,
    fuse_linear_bn_weights,
)

import bnlab.torch as bt  # noqa: E402
from bnlab.torch import functional as BF  # noqa: E402

LOW = [torch.bfloat16, torch.float16]


@pytest.fixture(params=["auto", "always"])
def route(request):
    with bt.dispatch.kernel_route(request.param):
        yield request.param


def _twin(cls, ref: nn.Module) -> nn.Module:
    ours = cls(ref.num_features, ref.eps, ref.momentum, ref.affine, ref.track_running_stats)
    ours.load_state_dict(ref.state_dict())
    return ours.to(next(iter(ref.state_dict().values())).dtype).train(ref.training)


# --------------------------------------------------------------------------- memory formats


@pytest.mark.parametrize(
    "cls, shape, fmt",
    [
        (bt.BatchNorm2d, (4, 8, 10, 10), torch.channels_last),
        (bt.BatchNorm2d, (4, 1, 9, 9), torch.channels_last),
        (bt.BatchNorm2d, (4, 9, 1, 1), torch.channels_last),
        (bt.BatchNorm3d, (4, 8, 2, 10, 10), torch.channels_last_3d),
        (bt.BatchNorm3d, (4, 1, 2, 9, 9), torch.channels_last_3d),
        (bt.BatchNorm3d, (4, 9, 1, 1, 1), torch.channels_last_3d),
    ],
    ids=str,
)
@pytest.mark.parametrize("dtype, mixed", [(torch.float32, False)] + [(d, m) for d in LOW
                                          for m in (False, True)], ids=str)  # fmt: skip
def test_channels_last_equals_contiguous(cls, shape, fmt, dtype, mixed, route):
    """Channels-last input gives channels-last output, equal (values and gradients) to the
    contiguous computation; low precision with low-precision or float32 parameters."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    bn = cls(shape[1]).to(torch.float32 if mixed else dtype)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
    ref = copy.deepcopy(bn)
    results = []
    for m, memory_format in ((bn, fmt), (ref, torch.contiguous_format)):
        xi = x.to(memory_format=memory_format).requires_grad_()
        y = m(xi)
        y.backward(dy.to(memory_format=memory_format))
        assert y.is_contiguous(memory_format=memory_format)
        results.append((y, xi.grad, m.weight.grad, m.bias.grad))
    tol = {} if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("cls, shape, formats", [
    (bt.BatchNorm2d, (2, 4, 200, 200), (torch.contiguous_format, torch.channels_last)),
    (bt.BatchNorm3d, (2, 4, 4, 100, 100), (torch.contiguous_format, torch.channels_last_3d)),
], ids=["2d", "3d"])  # fmt: skip
def test_float16_input_does_not_overflow(cls, shape, formats, route):
    """80,000 values per channel: their sum of squares is past float16's 65504, so statistics
    must be accumulated in float32. Output and input gradient equal the float32 computation."""
    for fmt in formats:
        x = torch.randn(shape, dtype=torch.half).to(memory_format=fmt).requires_grad_()
        for param_dtype in (torch.half, torch.float32):
            bn = cls(shape[1]).to(param_dtype)
            ref = cls(shape[1])
            ref.load_state_dict(bn.float().state_dict())
            bn.to(param_dtype)
            x.grad = None
            y = bn(x)
            x32 = x.detach().float().requires_grad_()
            y32 = ref(x32)
            assert torch.isfinite(y).all()
            torch.testing.assert_close(y.float(), y32, rtol=1e-2, atol=1e-2)
            if param_dtype == torch.float32:
                dy = torch.rand(shape).half().to(memory_format=fmt)
                y.backward(dy)
                y32.backward(dy.float())
                assert torch.isfinite(x.grad).all()
                torch.testing.assert_close(x.grad.float(), x32.grad, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("cls", [bt.BatchNorm2d, bt.SyncBatchNorm])
def test_eval_on_permuted_input_is_channels_last(cls, route):
    """A (1, 3, 2, 1) tensor permuted to (1, 2, 3, 1) is channels-last dense: so is the output,
    equal to nn.BatchNorm2d on a contiguous copy; bfloat16/float16 input with float32 module."""
    x = torch.arange(6, dtype=torch.float).reshape(1, 3, 2, 1).permute(0, 2, 1, 3)
    bn = cls(2).float().eval()
    with torch.no_grad():
        bn.weight.uniform_(), bn.bias.uniform_()
    ref = nn.BatchNorm2d(2).eval()
    ref.load_state_dict(bn.state_dict())
    y = bn(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, ref(x.contiguous()))
    for dtype in LOW:
        xl = torch.arange(24, dtype=dtype).reshape(1, 3, 2, 4).permute(0, 2, 1, 3)
        mixed = cls(2).float().eval()
        torch.testing.assert_close(mixed(xl).float(), copy.deepcopy(mixed)(xl.float()),
                                   rtol=0.05, atol=0.05)  # fmt: skip


# --------------------------------------------------------------------------- errors


def test_one_value_per_channel_in_training_raises(route):
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bt.BatchNorm1d(10)(torch.rand(10)[None, :, None])


@pytest.mark.parametrize("which", ["running_mean", "running_var", "weight", "bias"])
def test_vector_of_the_wrong_size_raises(which, route):
    x = torch.rand(2, 10)
    for size in (9, 11):
        args = dict(running_mean=torch.rand(10), running_var=torch.rand(10))
        args[which] = torch.rand(size)
        with pytest.raises(RuntimeError):
            BF.batch_norm(x, **args)


def test_forward_gradient_of_running_statistics_is_refused(route):
    """Forward-mode AD through the input works; a tangent on the running statistics together
    with one on the input is PyTorch's error (eval; momentum is not used there)."""
    primals = (torch.randn(3, 2, 5), torch.randn(2), torch.randn(2).abs() + 0.5)
    for duals in [(0,), (1,), (1, 2), (0, 1), (0, 1, 2)]:
        with fwAD.dual_level():
            args = [fwAD.make_dual(p, torch.rand_like(p)) if i in duals else p
                    for i, p in enumerate(primals)]  # fmt: skip
            if 0 in duals and len(duals) > 1:
                with pytest.raises(RuntimeError, match="not differentiable wrt running_mean"):
                    BF.batch_norm(*args, training=False, momentum=-1.2)
            else:
                BF.batch_norm(*args, training=False, momentum=-1.2)


# --------------------------------------------------------------------------- buffers


def test_buffers_untouched_when_tracking_is_switched_off(route):
    bn = bt.BatchNorm1d(4, track_running_stats=True)
    bn.track_running_stats = False  # buffers exist, but are neither read nor updated
    before = copy.deepcopy(bn.state_dict())
    bn(torch.rand(32, 4))
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_num_batches_tracked_in_state_dict_and_meta_load():
    bn = bt.BatchNorm2d(3)
    assert bn.state_dict()["num_batches_tracked"] == 0
    bn.num_batches_tracked = torch.tensor(10)
    assert bn.state_dict()["num_batches_tracked"] == 10
    bn.load_state_dict({}, strict=False)
    assert bn.state_dict()["num_batches_tracked"] == 10
    with torch.device("meta"):
        meta = bt.BatchNorm2d(3)
    assert meta.num_batches_tracked.is_meta
    meta.load_state_dict({}, assign=True, strict=False)
    assert meta.state_dict()["num_batches_tracked"] == 0  # a real 0, no longer on meta


def test_empty_batch_of_another_dtype(route):
    """float64 empty batch into a float32 module: an empty float64 output, zero gradients for
    the parameters and the input, statistics unchanged."""
    bn = bt.BatchNorm2d(3)
    x = torch.randn(0, 3, 2, 2, dtype=torch.double, requires_grad=True)
    y = bn(x)
    assert y.shape == x.shape and y.dtype == torch.double
    y.backward(torch.rand_like(y))
    assert torch.equal(x.grad, torch.zeros_like(x))
    for p in bn.parameters():
        assert torch.equal(p.grad, torch.zeros_like(p))
    assert torch.equal(bn.running_mean, torch.zeros(3))
    assert torch.equal(bn.running_var, torch.ones(3))


def test_update_stats_in_training_only(route):
    bn = bt.BatchNorm1d(3)
    x = torch.rand(4, 3)
    for training, changes in ((True, True), (False, False)):
        bn.train(training)
        before = copy.deepcopy(bn.state_dict())
        bn(x)
        after = bn.state_dict()
        for name in ("running_mean", "running_var"):
            assert torch.equal(after[name], before[name]) != changes, name
        assert int(after["num_batches_tracked"]) == int(before["num_batches_tracked"]) + changes


def test_cumulative_average_with_momentum_none(route):
    bn = bt.BatchNorm1d(3, momentum=None)
    x1, x2 = torch.rand(4, 3), torch.rand(4, 3)
    y1 = bn(x1)
    m1, v1 = bn.running_mean.clone(), bn.running_var.clone()
    bn.reset_running_stats()
    assert torch.equal(bn.running_mean, torch.zeros(3)) and torch.equal(
        bn.running_var, torch.ones(3)
    )
    y2 = bn(x2)
    m2, v2 = bn.running_mean.clone(), bn.running_var.clone()
    bn.reset_running_stats()
    torch.testing.assert_close(bn(x1), y1)
    torch.testing.assert_close(bn(x2), y2)
    torch.testing.assert_close(bn.running_mean, (m1 + m2) / 2)
    torch.testing.assert_close(bn.running_var, (v1 + v2) / 2)


# --------------------------------------------------------------------------- values, gradients


@pytest.mark.parametrize("training", [False, True])
def test_functional_gradcheck_with_running_statistics(training, route):
    x = torch.arange(4 * 5 * 6, dtype=torch.double).view(4, 5, 6).requires_grad_()
    w = torch.arange(1, 6, dtype=torch.double, requires_grad=True)
    b = torch.arange(5, dtype=torch.double, requires_grad=True)
    rm, rv = 1 - torch.arange(5, dtype=torch.double), 2 * torch.arange(5, dtype=torch.double)

    def fn(x, w, b):
        return BF.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-4)

    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


@pytest.mark.parametrize("ndim", [2, 3])
def test_eval_is_repeatable_and_untracked_eval_equals_train(ndim, route):
    bn = bt.BatchNorm1d(3).eval()
    data = torch.rand([3] * ndim, requires_grad=True)
    grad = torch.rand([3] * ndim)
    outs = []
    for _ in range(2):
        data.grad = None
        y = bn(data)
        y.backward(grad)
        outs.append((y, data.grad))
    torch.testing.assert_close(outs[0], outs[1])
    bn = bt.BatchNorm1d(3, track_running_stats=False)
    data, grad = torch.rand(4, 3, requires_grad=True), torch.rand(4, 3)
    outs = []
    for mode in (True, False):  # no buffers: eval uses batch statistics too
        bn.train(mode)
        data.grad = None
        y = bn(data)
        y.backward(grad)
        outs.append((y, data.grad))
    torch.testing.assert_close(outs[0], outs[1])


@pytest.mark.parametrize("ndim", [2, 3])
def test_unit_affine_equals_no_affine(ndim, route):
    plain, affine = bt.BatchNorm1d(3, affine=False), bt.BatchNorm1d(3, affine=True)
    data = torch.rand([3] * ndim, requires_grad=True)
    outs = []
    for m in (affine, plain):
        data.grad = None
        y = m(data)
        y.backward(torch.rand_like(y, generator=torch.Generator().manual_seed(1)))
        outs.append((y, data.grad))
    torch.testing.assert_close(outs[0], outs[1])


# --------------------------------------------------------------------------- fusion, conversion


def test_conv_bn_fusion_in_eval(route):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 3, 5, 5, generator=g, dtype=torch.double)
    conv = nn.Conv2d(3, 6, 3).double().eval()
    for affine in (True, False):
        bn = bt.BatchNorm2d(6, affine=affine).double().eval()
        bn.running_mean = torch.randn(6, generator=g, dtype=torch.double)
        bn.running_var = torch.rand(6, generator=g, dtype=torch.double) + 0.5
        torch.testing.assert_close(fuse_conv_bn_eval(conv, bn)(x), bn(conv(x)))


def test_fused_weights_keep_requires_grad():
    conv, linear = nn.Conv2d(3, 3, 3), nn.Linear(3, 3)
    bn2, bn1 = bt.BatchNorm2d(3), bt.BatchNorm1d(3)
    for w_rg, b_rg in [(True, True), (True, False), (False, True), (False, False)]:
        for layer, bn, fuse in ((conv, bn2, fuse_conv_bn_weights),
                                (linear, bn1, fuse_linear_bn_weights)):  # fmt: skip
            layer.weight.requires_grad, layer.bias.requires_grad = w_rg, b_rg
            w, b = fuse(layer.weight, layer.bias, bn.running_mean, bn.running_var, bn.eps,
                        bn.weight, bn.bias)  # fmt: skip
            assert (w.requires_grad, b.requires_grad) == (w_rg, b_rg)


def test_convert_sync_batchnorm_keeps_state_and_other_layers():
    model = nn.Sequential(nn.BatchNorm1d(10), nn.InstanceNorm1d(10), nn.BatchNorm3d(4))
    model[0](torch.randn(6, 10))
    want = copy.deepcopy(model.state_dict())
    sync = bt.convert_sync_batchnorm(model)
    assert [type(m) for m in sync.children()] == [bt.SyncBatchNorm, nn.InstanceNorm1d,
                                                  bt.SyncBatchNorm]  # fmt: skip
    for k, v in sync.state_dict().items():
        assert torch.equal(v, want[k]), k
