"""Derivatives through bnlab's batch norm, on both routes: forward-mode AD, ``torch.func`` (vmap,
grad, jvp), batched gradients (``is_grads_batched``, ``jacobian(vectorize=True)``), gradcheck and
gradgradcheck in float64 with every mode checked (forward AD, batched, forward-over-reverse), and
PyTorch's custom-op checker on the ``torch.ops.bnlab`` operators."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
import torch.autograd.forward_ad as fwAD  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import grad, jvp, vmap  # noqa: E402

import bnlab.torch as bt  # noqa: E402

F64 = dict(dtype=torch.float64)
TOL = dict(rtol=1e-10, atol=1e-12)


@pytest.fixture(params=["always", "never"], ids=["kernels", "pytorch-op"])
def route(request):
    with bt.dispatch.kernel_route(request.param):
        yield request.param


def _pair(training, shape=(4, 3, 2, 2), fmt=torch.contiguous_format, **kw):
    """A bnlab module, its torch.nn twin (same random state) and an input (float64)."""
    g = torch.Generator().manual_seed(11)
    cls = {4: (bt.BatchNorm2d, nn.BatchNorm2d), 5: (bt.BatchNorm3d, nn.BatchNorm3d)}[len(shape)]
    ref = cls[1](shape[1], **F64, **kw).train(training)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5, generator=g), ref.bias.uniform_(-1, 1, generator=g)
        if ref.running_mean is not None:
            ref.running_mean.uniform_(-1, 1, generator=g)
            ref.running_var.uniform_(0.5, 2, generator=g)
    ours = cls[0](shape[1], **F64, **kw).train(training)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(shape, generator=g, **F64).to(memory_format=fmt)
    return ours, ref, x


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_mode_ad_matches_torch(training, route):
    ours, ref, x = _pair(training)
    t = torch.randn_like(x)
    tangents = []
    for m in (ours, ref):
        with fwAD.dual_level():
            tangents.append(fwAD.unpack_dual(m(fwAD.make_dual(x, t))).tangent)
    torch.testing.assert_close(tangents[0], tangents[1], **TOL)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked)  # counted as usual


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torch_func_transforms_match_torch(training, route):
    """grad, jvp and vmap; buffers are only read (eval) or absent (training without tracking),
    as PyTorch's own modules need under vmap."""
    ours, ref, x = _pair(training, track_running_stats=not training)
    t = torch.randn_like(x)
    xs = torch.randn(5, *x.shape, **F64)
    for transform in (
        lambda m: grad(lambda x: (m(x) * t).sum() ** 2)(x),
        lambda m: jvp(m, (x,), (t,))[1],
        lambda m: vmap(m)(xs),
    ):
        torch.testing.assert_close(transform(ours), transform(ref), **TOL)


def test_running_statistics_are_not_updated_under_vmap(route):
    """PyTorch's modules raise when vmap meets an in-place update of unbatched buffers; bnlab's
    rule needs a host decision, which vmap forbids: the statistics stay as they are."""
    ours, _, x = _pair(True)
    before = ours.running_mean.clone()
    vmap(ours)(torch.randn(3, *x.shape, **F64))
    assert torch.equal(ours.running_mean, before) and int(ours.num_batches_tracked) == 0


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=str)
def test_batched_gradients_match_torch(training, fmt, route):
    ours, ref, x = _pair(training, fmt=fmt)
    x.requires_grad_()
    v = torch.randn(7, *x.shape, **F64)
    results = []
    for m in (ours, ref):
        y = m(x)
        if route == "always":
            assert (type(y.grad_fn).__name__ == "KernelBatchNormBackward") == (m is ours)
        batched = torch.autograd.grad(y, x, v, is_grads_batched=True)[0]
        jac = torch.autograd.functional.jacobian(lambda z, m=m: m(z), x, vectorize=True)
        results.append((batched, jac))
    torch.testing.assert_close(results[0], results[1], **TOL)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape, fmt", [
    ((3, 2, 2, 3), torch.contiguous_format),
    ((3, 2, 2, 3), torch.channels_last),
    ((2, 3, 2, 2, 2), torch.channels_last_3d),
], ids=["NCHW", "NHWC", "NDHWC"])  # fmt: skip
def test_gradcheck_every_mode(training, shape, fmt, route):
    ours, _, x = _pair(training, shape, fmt)
    x.requires_grad_()
    names, params = zip(*ours.named_parameters(), strict=True)

    def fn(x, *ps):  # the parameters as inputs: gradcheck's forward-AD duals must be used
        return torch.func.functional_call(ours, dict(zip(names, ps, strict=True)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params), check_forward_ad=True,
                                    check_batched_grad=True)  # fmt: skip
    assert torch.autograd.gradgradcheck(fn, (x, *params), check_batched_grad=True,
                                        check_fwd_over_rev=True)  # fmt: skip


def _op_args(training):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, 5, 5, generator=g, **F64).requires_grad_()
    w = (torch.rand(3, generator=g, **F64) + 0.5).requires_grad_()
    b = torch.randn(3, generator=g, **F64).requires_grad_()
    stats = (torch.zeros(3, **F64), torch.ones(3, **F64))
    running = (None, None) if training else stats
    return x, w, b, running, stats


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_custom_ops_pass_pytorch_opcheck(training):
    """Schema, fake tensors, autograd registration and AOT dispatch (torch.library.opcheck)."""
    x, w, b, running, (rm, rv) = _op_args(training)
    ops = torch.ops.bnlab
    for xi in (x, x.detach().to(memory_format=torch.channels_last).requires_grad_()):
        torch.library.opcheck(ops.batch_norm.default,
                              (xi, w, b, *running, training, 1e-5, "", "warn"))  # fmt: skip
        y, *stats = ops.batch_norm(xi, w, b, *running, training, 1e-5, "", "warn")
        mean, var, rstd = (s.detach() for s in stats)
        dy = torch.randn_like(y)
        torch.library.opcheck(ops.batch_norm_backward.default,
                              (dy, xi.detach(), w.detach(), mean, var, rstd, training, 1e-5,
                               ""))  # fmt: skip
    args = (rm, rv, torch.tensor(0), mean, var, x[:, 0].numel(), None, "", "warn")
    torch.library.opcheck(ops.update_running_stats_.default, args)


def test_custom_ops_vmap_rule_loops_over_the_batch():
    x, w, b, _, _ = _op_args(True)
    xs = torch.randn(3, *x.shape, **F64)

    def fn(x):
        return torch.ops.bnlab.batch_norm(x, w.detach(), b.detach(), None, None, True, 1e-5,
                                          "", "warn")[0]  # fmt: skip

    want = torch.stack([fn(xi) for xi in xs])
    torch.testing.assert_close(vmap(fn)(xs), want, rtol=0, atol=0)
