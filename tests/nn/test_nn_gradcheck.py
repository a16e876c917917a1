"""Every layer's backward in float64, two ways, with a RANDOM upstream gradient:

1. numeric central differences of  L = Σ y·dout  with respect to x and every parameter;
2. PyTorch autograd of the same module (same weights, loaded through state_dict).
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from nn_helpers import numeric_grad, set_engine_kernels, to_torch_state

from bnlab import nn

torch = pytest.importorskip("torch")
tnn = torch.nn


def _bn_eval(cls, tcls, c):
    def make():
        m = cls(c).eval()
        r = np.random.default_rng(7)
        m.running_mean[...] = r.standard_normal(c)
        m.running_var[...] = r.uniform(0.5, 2.0, c)
        m.weight.data[...] = r.uniform(0.5, 1.5, c)
        m.bias.data[...] = r.standard_normal(c)
        return m

    return make, lambda: tcls(c).eval()


def _bn_train(cls, tcls, c, **kw):
    def make():
        m = cls(c, **kw)
        if m.affine:
            r = np.random.default_rng(8)
            m.weight.data[...] = r.uniform(0.5, 1.5, c)
            m.bias.data[...] = r.standard_normal(c)
        return m

    return make, lambda: tcls(c, **kw)


def _lenet_like():
    def make():
        return nn.Sequential(
            nn.Conv2d(1, 3, 3),
            nn.BatchNorm2d(3),
            nn.Sigmoid(),
            nn.AvgPool2d(2, 2),
            nn.Flatten(),
            nn.Linear(12, 5),
            nn.BatchNorm1d(5),
            nn.ReLU(),
            nn.Linear(5, 3),
        )

    def tmake():
        return tnn.Sequential(
            tnn.Conv2d(1, 3, 3),
            tnn.BatchNorm2d(3),
            tnn.Sigmoid(),
            tnn.AvgPool2d(2, 2),
            tnn.Flatten(),
            tnn.Linear(12, 5),
            tnn.BatchNorm1d(5),
            tnn.ReLU(),
            tnn.Linear(5, 3),
        )

    return make, tmake


CASES = {
    "conv": (lambda: nn.Conv2d(3, 4, 3), lambda: tnn.Conv2d(3, 4, 3), (2, 3, 6, 6)),
    "conv_one_channel_pad": (  # with kernels: the direct kernels (forward, dW) of _conv_direct
        lambda: nn.Conv2d(1, 3, (3, 5), padding=(1, 2)),
        lambda: tnn.Conv2d(1, 3, (3, 5), padding=(1, 2)),
        (2, 1, 5, 6),
    ),
    "conv_stride_pad": (
        lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1),
        lambda: tnn.Conv2d(3, 4, 3, stride=2, padding=1),
        (2, 3, 7, 6),
    ),
    "conv_dilation_groups_nobias": (
        lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2, bias=False),
        lambda: tnn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2, bias=False),
        (2, 4, 5, 5),
    ),
    "conv_rect": (
        lambda: nn.Conv2d(2, 3, (2, 3), stride=(2, 1), padding=(1, 0)),
        lambda: tnn.Conv2d(2, 3, (2, 3), stride=(2, 1), padding=(1, 0)),
        (2, 2, 5, 6),
    ),
    "linear": (lambda: nn.Linear(5, 4), lambda: tnn.Linear(5, 4), (3, 5)),
    "linear_3d_nobias": (
        lambda: nn.Linear(5, 4, bias=False),
        lambda: tnn.Linear(5, 4, bias=False),
        (2, 3, 5),
    ),
    "bn1d": (*_bn_train(nn.BatchNorm1d, tnn.BatchNorm1d, 4), (6, 4)),
    "bn1d_ncl": (*_bn_train(nn.BatchNorm1d, tnn.BatchNorm1d, 3), (4, 3, 5)),
    "bn2d": (*_bn_train(nn.BatchNorm2d, tnn.BatchNorm2d, 3), (4, 3, 3, 3)),
    "bn2d_no_affine": (
        *_bn_train(nn.BatchNorm2d, tnn.BatchNorm2d, 3, affine=False),
        (4, 3, 3, 3),
    ),
    "bn2d_eval": (*_bn_eval(nn.BatchNorm2d, tnn.BatchNorm2d, 3), (4, 3, 3, 3)),
    "bn1d_eval": (*_bn_eval(nn.BatchNorm1d, tnn.BatchNorm1d, 5), (4, 5)),
    "layernorm": (lambda: nn.LayerNorm((3, 4)), lambda: tnn.LayerNorm((3, 4)), (2, 5, 3, 4)),
    "groupnorm": (lambda: nn.GroupNorm(2, 4), lambda: tnn.GroupNorm(2, 4), (2, 4, 3, 3)),
    "relu": (nn.ReLU, tnn.ReLU, (3, 4, 5)),
    "sigmoid": (nn.Sigmoid, tnn.Sigmoid, (3, 4, 5)),
    "maxpool": (lambda: nn.MaxPool2d(2), lambda: tnn.MaxPool2d(2), (2, 3, 6, 6)),
    "maxpool_overlap_pad": (
        lambda: nn.MaxPool2d(3, stride=2, padding=1),
        lambda: tnn.MaxPool2d(3, stride=2, padding=1),
        (2, 2, 7, 7),
    ),
    "avgpool_tile": (lambda: nn.AvgPool2d((3, 2)), lambda: tnn.AvgPool2d((3, 2)), (2, 3, 6, 4)),
    "avgpool_tile_2x2": (lambda: nn.AvgPool2d(2, 2), lambda: tnn.AvgPool2d(2, 2), (2, 3, 6, 4)),
    "avgpool_overlap_pad": (
        lambda: nn.AvgPool2d(3, stride=2, padding=1),
        lambda: tnn.AvgPool2d(3, stride=2, padding=1),
        (2, 2, 7, 6),
    ),
    "adaptive_global": (
        lambda: nn.AdaptiveAvgPool2d(1),
        lambda: tnn.AdaptiveAvgPool2d(1),
        (2, 3, 5, 4),
    ),
    "adaptive_uneven": (
        lambda: nn.AdaptiveAvgPool2d((3, 2)),
        lambda: tnn.AdaptiveAvgPool2d((3, 2)),
        (2, 3, 7, 5),
    ),
    "flatten": (nn.Flatten, tnn.Flatten, (2, 3, 4)),
    "sequential_lenet_like": (*_lenet_like(), (4, 1, 6, 6)),
}


def _run(module, x, dout):
    module.zero_grad()
    y = module(x)
    dx = module.backward(dout)
    return y, dx, {k: p.grad.copy() for k, p in module.named_parameters()}


# the engine's numba kernels only change conv (im2col, col2im, direct kernels), tiled average
# pooling and the sigmoid's backward
KERNEL_CASES = [
    "conv",
    "conv_one_channel_pad",
    "conv_stride_pad",
    "conv_dilation_groups_nobias",
    "avgpool_tile",
    "avgpool_tile_2x2",
    "sigmoid",
]
PARAMS = [(n, False) for n in sorted(CASES)] + [(n, True) for n in KERNEL_CASES]


@pytest.mark.parametrize(("name", "kernels"), PARAMS, ids=[f"{n}-{k}" for n, k in PARAMS])
def test_backward_numeric_and_torch(name, kernels, monkeypatch):
    set_engine_kernels(monkeypatch, kernels)
    make, tmake, shape = CASES[name]
    rng = np.random.default_rng(zlib.crc32(name.encode()))  # stable across processes
    module = make().double()
    x = rng.standard_normal(shape)
    y = module(x)
    dout = rng.standard_normal(y.shape)  # random upstream gradient, never ones
    y, dx, grads = _run(module, x, dout)

    # 1. numeric
    def loss():
        return float((module(x) * dout).sum())

    np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=1e-5, atol=1e-7)
    for pname, p in module.named_parameters():
        np.testing.assert_allclose(
            grads[pname], numeric_grad(loss, p.data), rtol=1e-5, atol=1e-7, err_msg=pname
        )

    # 2. PyTorch autograd on the same weights
    tm = tmake().double()
    tm.load_state_dict(to_torch_state(module))
    tm.train(module.training)
    tx = torch.from_numpy(x.copy()).requires_grad_(True)
    ty = tm(tx)
    ty.backward(torch.from_numpy(dout))
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-9, atol=1e-11)
    for pname, tp in tm.named_parameters():
        np.testing.assert_allclose(grads[pname], tp.grad.numpy(), rtol=1e-9, atol=1e-11)


def test_cross_entropy_backward_numeric_and_torch():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((6, 5)) * 3
    labels = rng.integers(0, 5, 6)
    for reduction in ("mean", "sum"):
        ce = nn.CrossEntropyLoss(reduction)
        upstream = float(rng.uniform(0.5, 2.0))  # a random scalar upstream gradient
        ce(logits, labels)
        d = ce.backward(upstream)
        num = numeric_grad(lambda ce=ce, u=upstream: u * ce(logits, labels), logits)
        np.testing.assert_allclose(d, num, rtol=1e-6, atol=1e-8)
        tl = torch.from_numpy(logits.copy()).requires_grad_(True)
        tloss = torch.nn.functional.cross_entropy(tl, torch.from_numpy(labels), reduction=reduction)
        (tloss * upstream).backward()
        assert ce(logits, labels) == pytest.approx(tloss.item(), rel=1e-12)
        np.testing.assert_allclose(d, tl.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_cross_entropy_is_stable_for_huge_logits():
    ce = nn.CrossEntropyLoss()
    logits = np.array([[1e4, 0.0, -1e4], [-1e4, 1e4, 0.0]], np.float32)
    loss = ce(logits, np.array([0, 0]))
    assert np.isfinite(loss) and loss == pytest.approx(1e4, rel=1e-6)
    assert np.isfinite(ce.backward()).all()
