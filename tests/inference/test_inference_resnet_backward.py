"""Backward of bnlab's Bottleneck/ResNet in float64: vs PyTorch autograd and numeric gradients.

Training mode (BN with batch statistics), a random upstream gradient (never ones), a tiny
ResNet (one block per stage, 32x32 input) so the check is cheap.
"""

from __future__ import annotations

import numpy as np
import pytest
from torch_resnet import ResNet as TorchResNet

from bnlab.models.resnet import Bottleneck, ResNet

torch = pytest.importorskip("torch")


def _pair(seed=0):
    tmodel = TorchResNet(layers=(1, 1, 1, 1), num_classes=7).double().train()
    model = ResNet(layers=(1, 1, 1, 1), num_classes=7, dtype=np.float64).train()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tmodel.named_parameters():
            if name.endswith("weight") and p.ndim == 1:  # BN gamma: around 1, not exactly 1
                p.copy_(torch.rand(p.shape, generator=g, dtype=torch.float64) + 0.5)
            elif name.endswith("bias") and p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.1)
    model.load_state_dict({k: v.numpy() for k, v in tmodel.state_dict().items()})
    return tmodel, model


def test_resnet_backward_matches_torch_autograd(rng):
    tmodel, model = _pair()
    x = rng.standard_normal((3, 3, 32, 32))
    dout = rng.standard_normal((3, 7))
    tx = torch.from_numpy(x.copy()).requires_grad_(True)
    ty = tmodel(tx)
    ty.backward(torch.from_numpy(dout))
    y = model(x)
    dx = model.backward(dout)
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-7, atol=1e-10)
    tparams = dict(tmodel.named_parameters())
    for name, p in model.named_parameters():
        np.testing.assert_allclose(
            p.grad, tparams[name].grad.numpy(), rtol=1e-6, atol=1e-9, err_msg=name
        )
    assert np.abs(dx).max() > 0


def _bottleneck(rng):
    """A tiny float64 bottleneck with a strided downsample (4 -> 2 -> 8 channels, stride 2)."""
    from bnlab.inference.spec import ConvSpec

    def cv(name, c_in, c_out, k, stride, pad):
        return ConvSpec(f"{name}", f"bn_{name}", c_in, c_out, k, stride, pad)

    blk = Bottleneck(
        cv("c1", 4, 2, 1, 1, 0),
        cv("c2", 2, 2, 3, 2, 1),
        cv("c3", 2, 8, 1, 1, 0),
        cv("d", 4, 8, 1, 2, 0),
        dtype=np.float64,
        rng=rng,
    )
    for m in blk.modules():
        if hasattr(m, "running_var"):
            m.weight.data[...] = rng.uniform(0.5, 1.5, m.num_features)
            m.bias.data[...] = rng.standard_normal(m.num_features) * 0.1
    return blk.train()


def test_bottleneck_backward_matches_numeric_gradient(rng):
    """Central differences on a small block (few ReLU kinks near the evaluation point)."""
    blk = _bottleneck(rng)
    x = rng.standard_normal((2, 4, 6, 6))
    dout = rng.standard_normal((2, 8, 3, 3))
    blk(x)
    dx = blk.backward(dout)

    def loss():
        return float((blk(x) * dout).sum())

    h = 1e-6
    for idx in [(0, 0, 0, 0), (1, 3, 5, 2), (0, 2, 3, 3), (1, 1, 4, 5)]:
        old = x[idx]
        x[idx] = old + h
        plus = loss()
        x[idx] = old - h
        minus = loss()
        x[idx] = old
        np.testing.assert_allclose(dx[idx], (plus - minus) / (2 * h), rtol=1e-5, atol=1e-8)
    for p in (blk.conv2.weight, blk.downsample[0].weight, blk.bn3.weight):
        grad = p.grad.copy()
        for idx in [(0,) * p.data.ndim, tuple(s - 1 for s in p.data.shape)]:
            old = p.data[idx]
            p.data[idx] = old + h
            plus = loss()
            p.data[idx] = old - h
            minus = loss()
            p.data[idx] = old
            np.testing.assert_allclose(grad[idx], (plus - minus) / (2 * h), rtol=1e-5, atol=1e-8)
