"""PyTorch's own ModuleInfo cases for BatchNorm1d/2d/3d, run against bnlab's classes.

The cases come from ``torch.testing._internal.common_modules.module_db`` (shipped in the torch
wheel, imported by the ``pytorch_module_db`` fixture): for each class, constructor arguments and a
forward input (affine or not, tracking or not, momentum=None, bias=False, a zero-size batch, ...)
and the error inputs (eps = 0 and eps < 0). Each case is checked the way PyTorch's
``test/test_modules.py`` checks ``torch.nn`` modules — forward and dtype conversion, factory
kwargs, repr, pickling, non-contiguous input, gradcheck/gradgradcheck in float64 (total and
partial derivatives, batched gradients), memory formats, use of the ``training`` flag, meta-device
construction, the error inputs — and, beyond that, against ``torch.nn``'s class on the same input.
Every test runs on both routes: ``auto`` (these inputs are below the break-even size, so PyTorch's
op computes them) and ``always`` (bnlab's kernels wherever they can run).
"""

from __future__ import annotations

import pickle
from itertools import product

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import bnlab.torch as bt  # noqa: E402

NAMES = ("nn.BatchNorm1d", "nn.BatchNorm2d", "nn.BatchNorm3d")
OURS = {
    nn.BatchNorm1d: bt.BatchNorm1d,
    nn.BatchNorm2d: bt.BatchNorm2d,
    nn.BatchNorm3d: bt.BatchNorm3d,
}
DTYPES = [torch.float32, torch.float64]
CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


@pytest.fixture(params=NAMES)
def info(request, pytorch_module_db):
    return pytorch_module_db[request.param]


@pytest.fixture(params=["auto", "always"])
def route(request):
    with bt.dispatch.kernel_route(request.param):
        yield request.param


def _cases(info, dtype, training, requires_grad=False):
    cases = info.module_inputs_func(
        info, device="cpu", dtype=dtype, requires_grad=requires_grad, training=training
    )
    return [c for c in cases if c.forward_input is not None]


def _build(cls, case, dtype, training):
    ctor = case.constructor_input
    m = cls(*ctor.args, **ctor.kwargs).to(dtype)
    m.train(training)
    return m


def _input(case):
    (x,) = case.forward_input.args
    return x


def _assert_on(module, device, dtype):
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        assert t.device == torch.device(device), name
        if t.dtype.is_floating_point:
            assert t.dtype == dtype, name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_matches_torch_and_follows_dtype_conversion(info, dtype, training, route):
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)
    for case in _cases(info, dtype, training):
        ours, ref = _build(OURS[info.module_cls], case, dtype, training), None
        ref = _build(info.module_cls, case, dtype, training)
        x = _input(case)
        for _ in range(2):  # the second call sees updated running statistics
            torch.testing.assert_close(ours(x), ref(x), **tol, msg=case.desc)
        for (name, a), b in zip(ref.state_dict().items(), ours.state_dict().values(), strict=True):
            if name == "num_batches_tracked" and x.numel() == 0:
                assert int(b) == 0  # bnlab: an empty batch is not counted (docs/torch.md)
            else:
                torch.testing.assert_close(b, a, **tol, msg=f"{case.desc}: {name}")
        getattr(ours, {torch.float32: "float", torch.float64: "double"}[dtype])()
        ours(x)
        _assert_on(ours, "cpu", dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_factory_kwargs_repr_and_meta_construction(info, dtype, training):
    cls = OURS[info.module_cls]
    for case in _cases(info, dtype, training):
        ctor = case.constructor_input
        m = cls(*ctor.args, **ctor.kwargs, device="cpu", dtype=dtype)
        m.train(training)
        _assert_on(m, "cpu", dtype)
        ref = info.module_cls(*ctor.args, **ctor.kwargs)
        assert repr(m) == repr(ref) and str(m) == str(ref)
        with torch.device("meta"):
            meta = cls(*ctor.args, **ctor.kwargs)
        cpu = cls(*ctor.args, **ctor.kwargs)
        for (name, a), b in zip(
            [*meta.named_parameters(), *meta.named_buffers()],
            [*cpu.parameters(), *cpu.buffers()],
            strict=True,
        ):
            assert a.is_meta and a.shape == b.shape and a.dtype == b.dtype, name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_pickled_module_gives_the_same_output(info, dtype, training, route):
    for case in _cases(info, dtype, training):
        m = _build(OURS[info.module_cls], case, dtype, training)
        x = _input(case)
        m(x)
        copy = pickle.loads(pickle.dumps(m))  # in memory: the class must pickle by reference
        assert type(copy) is type(m)
        torch.testing.assert_close(copy(x), m(x), rtol=0, atol=0)


def _non_contiguous(t):
    out = torch.repeat_interleave(t, 2, dim=-1)[..., ::2].detach()
    return out.requires_grad_(t.requires_grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_non_contiguous_input_and_gradient(info, dtype, training, route):
    for case in _cases(info, dtype, training, requires_grad=True):
        m = _build(OURS[info.module_cls], case, dtype, training)
        x = _input(case)
        y = m(x)
        if x.numel():  # the route this test runs on is the one taken (empty batches take none)
            kernels = type(y.grad_fn).__name__ == "KernelBatchNormBackward"
            assert kernels == (route == "always"), case.desc
        dy = torch.randn_like(y)
        results = []
        for xi, dyi in product([x, _non_contiguous(x)], [dy, _non_contiguous(dy)]):
            xi = xi.detach().requires_grad_()
            m.zero_grad(set_to_none=True)
            out = m(xi)
            out.backward(dyi)
            results.append((out, xi.grad, *[p.grad for p in m.parameters()]))
        for other in results[1:]:
            for a, b in zip(results[0], other, strict=True):
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-4, msg=case.desc)


def _gradcheck_case(m, x, check):
    """Total derivative, then each parameter alone (the others frozen), as test_modules does."""
    params = tuple(m.parameters())

    def fn(x, *ps):
        return m(x)

    assert check(fn, (x, *params))
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    for p, old in zip(params, saved, strict=True):
        p.requires_grad_(old)
        assert check(fn, (x, *params))
        p.requires_grad_(False)
    for p, old in zip(params, saved, strict=True):
        p.requires_grad_(old)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_and_gradgradcheck_float64(info, training, route):
    def gradcheck(fn, inputs):
        return torch.autograd.gradcheck(fn, inputs, check_batched_grad=True, fast_mode=True)

    def gradgradcheck(fn, inputs):
        return torch.autograd.gradgradcheck(fn, inputs, check_batched_grad=True, fast_mode=True)

    for case in _cases(info, torch.float64, training, requires_grad=True):
        m = _build(OURS[info.module_cls], case, torch.float64, training)
        x = _input(case)
        _gradcheck_case(m, x, gradcheck)
        assert info.supports_gradgrad
        _gradcheck_case(m, x, gradgradcheck)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_memory_formats_give_equal_results_in_their_format(info, dtype, training, route):
    for case in _cases(info, dtype, training, requires_grad=True):
        m = _build(OURS[info.module_cls], case, dtype, training)
        x = _input(case)
        fmt = CHANNELS_LAST.get(x.dim())
        y = m(x)
        dy = torch.rand_like(y)
        params = [p for p in m.parameters() if p.requires_grad]
        want = torch.autograd.grad(y, [x, *params], dy) if training else None
        for in_fmt, mod_fmt in product(
            [torch.contiguous_format] + ([fmt] if fmt else []),
            [torch.preserve_format, torch.contiguous_format] + ([fmt] if fmt else []),
        ):
            xi = x.detach().clone().to(memory_format=in_fmt).requires_grad_()
            m.to(memory_format=mod_fmt)
            out = m(xi)
            torch.testing.assert_close(out, y, msg=case.desc)
            assert out.is_contiguous(memory_format=in_fmt if x.dim() in CHANNELS_LAST else
                                     torch.contiguous_format)  # fmt: skip
            if training:
                got = torch.autograd.grad(out, [xi, *params], torch.empty_like(out).copy_(dy))
                torch.testing.assert_close(got, want, msg=case.desc)
                assert got[0].is_contiguous(memory_format=in_fmt)


def test_forward_reads_the_training_flag(info, route):
    assert info.train_and_eval_differ
    for case in _cases(info, torch.float32, True):
        m = _build(OURS[info.module_cls], case, torch.float32, True)
        delattr(m, "training")
        with pytest.raises(AttributeError, match="'training'"):
            m(_input(case))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_error_inputs_raise_like_torch(info, training, route):
    from torch.testing._internal.common_modules import ModuleErrorEnum

    errors = info.module_error_inputs_func(
        info, device="cpu", dtype=torch.float32, requires_grad=False, training=training
    )
    assert errors
    for err in errors:
        case = err.module_error_input
        ctor, fwd = case.constructor_input, case.forward_input
        assert err.error_on == ModuleErrorEnum.FORWARD_ERROR
        m = OURS[info.module_cls](*ctor.args, **ctor.kwargs)
        with pytest.raises(err.error_type, match=err.error_regex):
            m(*fwd.args, **fwd.kwargs)
