"""Which route computes a call (bnlab's kernels or PyTorch's op), the rules every route keeps
(a non-finite batch or an update that overflows the buffers' dtype never reaches them; a refused
update does not count), PyTorch 2.13's edge behaviour (eps in training vs eval, empty batches of
another dtype), BatchNorm3d and SyncBatchNorm on 5-D input, and that a kernel output never aliases
an input."""

from __future__ import annotations

import copy
import warnings

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import bnlab.torch as bt  # noqa: E402
from bnlab.errors import NonFiniteBatchWarning, NonFiniteError  # noqa: E402
from bnlab.torch import functional as BF  # noqa: E402
from bnlab.torch.dispatch import break_even  # noqa: E402

KERNEL = "KernelBatchNormBackward"


def _route_of(module, x) -> str:
    y = module(x.requires_grad_())
    return "kernels" if type(y.grad_fn).__name__ == KERNEL else "pytorch"


# --------------------------------------------------------------------------- route decision


def test_size_and_layout_decide_in_auto_mode():
    """Training NCHW takes the kernels from break_even(True, "NCL") bytes; the same tensor
    channels-last (a larger break-even) and in eval stays on PyTorch's op."""
    elements = break_even(True, "NCL") // 4  # float32
    assert break_even(True, "NCL") < break_even(True, "NLC")
    big = torch.randn(elements // 2048, 8, 16, 16)
    small = torch.randn(4, 8, 4, 4)
    assert _route_of(bt.BatchNorm2d(8), small) == "pytorch"
    assert _route_of(bt.BatchNorm2d(8), big) == "kernels"
    assert _route_of(bt.BatchNorm2d(8), big.to(memory_format=torch.channels_last)) == "pytorch"
    assert _route_of(bt.BatchNorm2d(8).eval(), big) == "pytorch"
    with bt.dispatch.kernel_route("never"):
        assert _route_of(bt.BatchNorm2d(8), big) == "pytorch"
    with bt.dispatch.kernel_route("always"):
        assert _route_of(bt.BatchNorm2d(8), small) == "kernels"
    with pytest.raises(ValueError, match="mode"):
        bt.dispatch.kernel_route("sometimes").__enter__()


class _Tagged(torch.Tensor):
    """A tensor subclass: bnlab hands those to PyTorch's op."""


@pytest.mark.parametrize(
    "case",
    ["float16", "bfloat16", "strided", "subclass", "eps 0 in eval", "forward AD", "mixed dtype"],
)
def test_what_the_kernels_do_not_take_runs_pytorch_op(case):
    m = bt.BatchNorm2d(3)
    x = torch.randn(4, 3, 6, 5)
    if case in ("float16", "bfloat16"):
        x = x.to(getattr(torch, case))
    elif case == "strided":
        x = x.transpose(2, 3)
    elif case == "subclass":
        x = x.as_subclass(_Tagged)
    elif case == "eps 0 in eval":
        m = bt.BatchNorm2d(3, eps=0.0).eval()
    elif case == "mixed dtype":
        m, x = bt.BatchNorm2d(3), x.bfloat16()
    with bt.dispatch.kernel_route("always"):
        if case == "forward AD":
            import torch.autograd.forward_ad as fwAD

            with fwAD.dual_level():
                y = m(fwAD.make_dual(x, torch.ones_like(x)))
                assert fwAD.unpack_dual(y).tangent is not None
            return
        assert _route_of(m, x) == "pytorch"
    ref = nn.BatchNorm2d(3, eps=m.eps).train(m.training)
    torch.testing.assert_close(m(x.detach()), ref(x.detach()), rtol=1e-2, atol=1e-2)


# --------------------------------------------------------------------------- PyTorch 2.13 edges


@pytest.mark.parametrize("eps", [0.0, -1.0, 0])
def test_eps_rule_of_pytorch_2_13(eps):
    """eps <= 0 in training: PyTorch's ValueError and message (the value as given), nothing
    counted; eps == 0 in eval: accepted; eps < 0 in eval: PyTorch's other message."""
    x = torch.randn(4, 3, 2, 2)
    outs = []
    for cls in (nn.BatchNorm2d, bt.BatchNorm2d):
        m = cls(3, eps=eps)
        with pytest.raises(ValueError) as err:
            m(x)
        assert str(err.value) == f"batch_norm eps must be positive during training, but got {eps}"
        m.eval()
        if eps < 0:
            with pytest.raises(ValueError, match=f"eps must be non-negative, but got {eps}"):
                m(x)
        else:
            outs.append(m(x))
    assert int(m.num_batches_tracked) == 0  # bnlab: the failing training call counted nothing
    if outs:
        torch.testing.assert_close(outs[1], outs[0])


@pytest.mark.parametrize("x_dtype", [torch.int64, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("p_dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("training", [True, False])
def test_empty_batch_of_any_dtype_is_pytorchs_output(x_dtype, p_dtype, training):
    for affine in (True, False):
        ours = bt.BatchNorm2d(3, affine=affine, dtype=p_dtype).train(training)
        ref = nn.BatchNorm2d(3, affine=affine, dtype=p_dtype).train(training)
        x = torch.zeros(0, 3, 2, 2, dtype=x_dtype)
        y, want = ours(x), ref(x)
        assert y.shape == want.shape and y.dtype == want.dtype
        assert int(ours.num_batches_tracked) == 0  # bnlab: an empty batch does not count


def test_momentum_is_validated_only_when_used():
    x, rm, rv = torch.randn(4, 3), torch.zeros(3), torch.ones(3)
    BF.batch_norm(x, rm, rv, training=False, momentum=-1.2)  # eval: unused, as in PyTorch
    BF.batch_norm(x, None, None, training=True, momentum=2.0)  # no buffers: unused
    with pytest.raises(ValueError, match="momentum must be in"):
        BF.batch_norm(x, rm, rv, training=True, momentum=-1.2)
    with pytest.raises(TypeError, match="momentum"):
        BF.batch_norm(x, rm, rv, training=False, momentum="0.1")
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


# --------------------------------------------------------------------------- bnlab's guard


@pytest.fixture(params=["always", "never"], ids=["kernels", "pytorch-op"])
def route(request):
    with bt.dispatch.kernel_route(request.param):
        yield request.param


@pytest.mark.parametrize("policy", ["warn", "raise"])
def test_nonfinite_batch_never_reaches_the_buffers(route, policy):
    m = bt.BatchNorm2d(3)
    m(torch.randn(4, 3, 2, 2))
    before = copy.deepcopy(m.state_dict())
    x = torch.randn(4, 3, 2, 2)
    x[1, 2, 0, 1] = float("inf")
    if policy == "warn":
        with pytest.warns(NonFiniteBatchWarning, match="not finite"):
            m(x)
    else:
        with pytest.raises(NonFiniteError):
            kw = dict(num_batches_tracked=m.num_batches_tracked, on_nonfinite="raise")
            BF.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, True, **kw)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_float16_running_variance_never_becomes_inf(route):
    """A finite float16 batch whose variance passes 65504: the update is refused (it would be
    Inf in the buffer), the buffers and the counter stay; the output is still computed."""
    m = bt.BatchNorm2d(2).half()
    x = (torch.randn(8, 2, 4, 4) * 1500).half()  # variance ~2e6: 0.1 of it is past 65504
    with pytest.warns(NonFiniteBatchWarning, match="overflows the buffers' dtype"):
        y = m(x)
    assert torch.isfinite(y).all()
    assert torch.equal(m.running_var, torch.ones(2, dtype=torch.half))
    assert int(m.num_batches_tracked) == 0
    m(torch.randn(8, 2, 4, 4).half())  # a normal batch updates as usual
    assert int(m.num_batches_tracked) == 1 and torch.isfinite(m.running_var).all()


def test_float32_running_variance_overflow_is_refused(route):
    m = bt.BatchNorm1d(2)
    x = torch.randn(16, 2) * 1e20  # variance 1e40: finite in float64, not in float32
    with pytest.warns(NonFiniteBatchWarning):
        m(x)
    assert torch.equal(m.running_var, torch.ones(2)) and int(m.num_batches_tracked) == 0


def test_traced_rule_is_branch_free_and_silent():
    from bnlab.torch._running import traced_update_

    rm, rv, n = torch.zeros(2, dtype=torch.half), torch.ones(2, dtype=torch.half), torch.tensor(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        traced_update_(rm, rv, torch.zeros(2), torch.full((2,), 1e6), 10, None, n)  # overflows
        assert torch.equal(rv, torch.ones(2, dtype=torch.half)) and int(n) == 3
        traced_update_(rm, rv, torch.ones(2), torch.full((2,), 2.0), 10, None, n)
    assert int(n) == 4
    torch.testing.assert_close(rm, torch.full((2,), 0.25, dtype=torch.half))  # w = 1/4


# --------------------------------------------------------------------------- 5-D input


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last_3d], ids=str)
@pytest.mark.parametrize("training", [True, False])
def test_batchnorm3d_matches_torch_on_the_kernels(fmt, training):
    g = torch.Generator().manual_seed(4)
    ref = nn.BatchNorm3d(3, dtype=torch.float64).train(training)
    with torch.no_grad():
        ref.running_mean.uniform_(-1, 1, generator=g), ref.weight.uniform_(0.5, 2, generator=g)
    ours = bt.convert(copy.deepcopy(ref))
    assert type(ours) is bt.BatchNorm3d
    x = torch.randn(4, 3, 3, 4, 5, generator=g, dtype=torch.float64).to(memory_format=fmt)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    outs = []
    with bt.dispatch.kernel_route("always"):
        for m in (ours, ref):
            xi = x.clone().requires_grad_()
            y = m(xi)
            y.backward(dy)
            outs.append((y, xi.grad, m.weight.grad, m.bias.grad, *m.buffers()))
    assert type(outs[0][0].grad_fn).__name__ == KERNEL
    assert outs[0][0].is_contiguous(memory_format=fmt) and outs[0][1].is_contiguous(
        memory_format=fmt
    )
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert type(bt.revert(ours)) is nn.BatchNorm3d


def test_sync_batchnorm_takes_5d_input_in_one_process():
    m = bt.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm3d(2)))[0]
    x = torch.randn(3, 2, 2, 3, 3)
    torch.testing.assert_close(m.eval()(x), nn.BatchNorm3d(2).eval()(x))
    with pytest.raises(ValueError, match="at least 2D"):
        m(torch.randn(3))


# --------------------------------------------------------------------------- aliasing


def test_kernel_output_never_aliases_an_input_and_inplace_edits_are_caught():
    """Chained layers: the first output (reused memory from bnlab.buffers) is the second input;
    the second output must get other memory, and gradients must equal torch's. Editing an input
    after the forward is caught by autograd's version counter, on both routes."""
    shape = (2, 8, 128, 130)  # above the buffer cache's minimum size
    x = torch.randn(shape, requires_grad=True)
    dy = torch.randn(shape)
    grads = []
    with bt.dispatch.kernel_route("always"):
        for a, b in (
            (bt.BatchNorm2d(8), bt.BatchNorm2d(8)),
            (nn.BatchNorm2d(8), nn.BatchNorm2d(8)),
        ):
            x.grad = None
            h = a(x)
            y = b(h)
            assert y.data_ptr() != h.data_ptr() and h.data_ptr() != x.data_ptr()
            y.backward(dy)
            grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-4)
    for mode in ("always", "never"):
        with bt.dispatch.kernel_route(mode):
            xx = torch.randn(4, 3, 2, 2, requires_grad=True) * 1
            y = bt.BatchNorm2d(3)(xx)
            xx.add_(1)
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                y.sum().backward()
