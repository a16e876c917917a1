"""Forward and backward against ``torch.nn.functional`` + autograd, float64, random upstream grad.

torch is a CI dependency (the ``torch`` extra); on a machine without it these tests skip.
"""

from __future__ import annotations

import numpy as np
import pytest
from fn_support import LAYOUT_SHAPES, channels, random_affine, random_buffers

from bnlab import functional as F
from bnlab.check import TOLERANCES, rel_error
from bnlab.functional._layout import get_layout

torch = pytest.importorskip("torch")
TF = torch.nn.functional

TOL = TOLERANCES["torch"]


def _leaf(a):
    return torch.tensor(a, dtype=torch.float64, requires_grad=True)


def _torch_apply(fn, x, g, b, dout, channel_axis):
    """Run ``fn(x_channels_first, γ, β)`` in torch; return y, dx, dγ, dβ in x's layout."""
    xt, gt, bt = _leaf(x), _leaf(g), _leaf(b)
    y = fn(xt.movedim(channel_axis, 1), gt, bt).movedim(1, channel_axis)
    y.backward(torch.tensor(dout))
    return [y.detach().numpy(), xt.grad.numpy(), gt.grad.numpy(), bt.grad.numpy()]


def _assert_close(ours, theirs, names=("y", "dx", "dgamma", "dbeta")):
    for name, a, t in zip(names, ours, theirs, strict=True):
        assert a.shape == t.shape, name
        err = rel_error(a, t)
        assert err < TOL, f"{name}: relative error {err:.2e} vs torch"


@pytest.mark.parametrize("layout,shape", LAYOUT_SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_vs_torch(rng, layout, shape, training, backend):
    c = channels(shape, layout)
    x = rng.standard_normal(shape) * 2 + 1
    g, b = random_affine(rng, c)
    rm, rv = random_buffers(rng, c)
    dout = rng.standard_normal(shape)
    rm_t, rv_t = torch.tensor(rm), torch.tensor(rv)

    y, cache = F.batch_norm_forward(
        x, g, b, training=training, running_mean=rm, running_var=rv, momentum=0.3,
        eps=1e-4, layout=layout, backend=backend,
    )  # fmt: skip
    ours = [y, *F.batch_norm_backward(dout, cache)]
    theirs = _torch_apply(
        lambda xt, gt, bt: TF.batch_norm(xt, rm_t, rv_t, gt, bt, training, 0.3, 1e-4),
        x, g, b, dout, get_layout(layout).channel_axis,
    )  # fmt: skip
    _assert_close(ours, theirs)
    _assert_close([rm, rv], [rm_t.numpy(), rv_t.numpy()], ("running_mean", "running_var"))


@pytest.mark.parametrize("layout,shape", LAYOUT_SHAPES)
def test_batch_norm_graph_backward_vs_torch(rng, layout, shape):
    c = channels(shape, layout)
    x = rng.standard_normal(shape) * 0.5 - 3
    g, b = random_affine(rng, c)
    dout = rng.standard_normal(shape)
    y, cache = F.batch_norm_forward(x, g, b, training=True, layout=layout)
    ours = [y, *F.batch_norm_backward_graph(dout, cache)]
    theirs = _torch_apply(
        lambda xt, gt, bt: TF.batch_norm(xt, None, None, gt, bt, True),
        x, g, b, dout, get_layout(layout).channel_axis,
    )  # fmt: skip
    _assert_close(ours, theirs)


@pytest.mark.parametrize(
    "shape,k", [((2, 1), 1), ((3, 5), 1), ((2, 3, 5), 1), ((2, 3, 5), 2), ((3, 2, 3, 1), 3)]
)
def test_layer_norm_vs_torch(rng, shape, k):
    normalized = shape[len(shape) - k :]
    x = rng.standard_normal(shape) * 3 + 2
    g = rng.standard_normal(normalized) + 1
    b = rng.standard_normal(normalized)
    dout = rng.standard_normal(shape)
    y, cache = F.layer_norm_forward(x, normalized, g, b, eps=1e-5)
    ours = [y, *F.layer_norm_backward(dout, cache)]
    # channel_axis=1 ↔ movedim(1, 1) is the identity: layer norm has no channel layout
    theirs = _torch_apply(
        lambda xt, gt, bt: TF.layer_norm(xt, normalized, gt, bt, 1e-5), x, g, b, dout, 1
    )
    _assert_close(ours, theirs)


def _gn_cases():
    for layout, shape in LAYOUT_SHAPES:
        c = channels(shape, layout)
        for groups in sorted({1, c} | ({2} if c % 2 == 0 else set())):
            yield layout, shape, groups


@pytest.mark.parametrize("layout,shape,groups", list(_gn_cases()))
def test_group_norm_vs_torch(rng, layout, shape, groups):
    c = channels(shape, layout)
    x = rng.standard_normal(shape) * 2 - 1
    g, b = random_affine(rng, c)
    dout = rng.standard_normal(shape)
    y, cache = F.group_norm_forward(x, groups, g, b, eps=1e-5, layout=layout)
    ours = [y, *F.group_norm_backward(dout, cache)]
    theirs = _torch_apply(
        lambda xt, gt, bt: TF.group_norm(xt, groups, gt, bt, 1e-5),
        x, g, b, dout, get_layout(layout).channel_axis,
    )  # fmt: skip
    _assert_close(ours, theirs)


@pytest.mark.parametrize("layout,shape", [(lay, s) for lay, s in LAYOUT_SHAPES if len(s) > 2])
def test_instance_norm_vs_torch(rng, layout, shape):
    x = rng.standard_normal(shape) + 5
    g, b = random_affine(rng, channels(shape, layout))
    dout = rng.standard_normal(shape)
    y, cache = F.instance_norm_forward(x, g, b, layout=layout)
    ours = [y, *F.instance_norm_backward(dout, cache)]
    theirs = _torch_apply(
        lambda xt, gt, bt: TF.instance_norm(xt, weight=gt, bias=bt, eps=1e-5),
        x, g, b, dout, get_layout(layout).channel_axis,
    )  # fmt: skip
    _assert_close(ours, theirs)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_low_precision_batch_norm_close_to_torch_float64(rng, dtype, backend):
    """float32/float16 input: output in the input dtype, within dtype_tolerance of float64."""
    from bnlab.check import centering_condition, dtype_tolerance

    x64 = rng.standard_normal((6, 3, 4, 5)) * 4 + 10
    g, b = random_affine(rng, 3)
    x = x64.astype(dtype)
    y, _ = F.batch_norm_forward(x, g.astype(dtype), b.astype(dtype), training=True, backend=backend)
    assert y.dtype == dtype
    ref = TF.batch_norm(
        torch.tensor(x.astype(np.float64)), None, None,
        torch.tensor(g.astype(dtype).astype(np.float64)),
        torch.tensor(b.astype(dtype).astype(np.float64)), True,
    ).numpy()  # fmt: skip
    x64 = x.astype(np.float64)
    kappa = centering_condition(x64, 1 / np.sqrt(x64.var(axis=(0, 2, 3)) + 1e-5))
    assert rel_error(y, ref) < dtype_tolerance(dtype, kappa, gradient=False)
