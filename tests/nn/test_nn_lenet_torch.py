"""LeNet-BN in bnlab vs the same model in PyTorch: weights load both ways, outputs agree, and one
SGD training step agrees (loss, every gradient, updated weights and running statistics)."""

from __future__ import annotations

import numpy as np
import pytest
from nn_helpers import to_torch_state

from bnlab import nn
from bnlab.models import lenet, lenet_bn
from bnlab.optim import SGD

torch = pytest.importorskip("torch")
t = torch.nn


def torch_lenet_bn():
    return t.Sequential(
        t.Conv2d(1, 6, 5), t.BatchNorm2d(6), t.Sigmoid(), t.AvgPool2d(2, 2),
        t.Conv2d(6, 16, 5), t.BatchNorm2d(16), t.Sigmoid(), t.AvgPool2d(2, 2), t.Flatten(),
        t.Linear(256, 120), t.BatchNorm1d(120), t.Sigmoid(),
        t.Linear(120, 84), t.BatchNorm1d(84), t.Sigmoid(), t.Linear(84, 10),
    )  # fmt: skip


def torch_lenet():
    return t.Sequential(
        t.Conv2d(1, 6, 5, padding=2), t.Sigmoid(), t.AvgPool2d(2, 2),
        t.Conv2d(6, 16, 5), t.Sigmoid(), t.AvgPool2d(2, 2), t.Flatten(),
        t.Linear(400, 120), t.Sigmoid(), t.Linear(120, 84), t.Sigmoid(), t.Linear(84, 10),
    )  # fmt: skip


PRE_BN_BIASES = {"0.bias", "4.bias", "9.bias", "12.bias"}


def _batch(n=64, seed=0):
    r = np.random.default_rng(seed)
    return r.random((n, 1, 28, 28), dtype=np.float32), r.integers(0, 10, n)


@pytest.mark.parametrize(("ours", "theirs"), [(lenet_bn, torch_lenet_bn), (lenet, torch_lenet)])
def test_pytorch_state_dict_loads_and_gives_same_outputs(ours, theirs):
    torch.manual_seed(0)
    tm = theirs()
    with torch.no_grad():  # non-trivial running statistics, so eval mode really uses them
        for m in tm.modules():
            if isinstance(m, t.BatchNorm1d | t.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    model = ours(0)
    model.load_state_dict(tm.state_dict())
    x, _ = _batch()
    for train in (False, True):
        model.train(train)
        tm.train(train)
        with torch.no_grad():
            ref = tm(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(model(x), ref, rtol=1e-4, atol=1e-5)


def test_one_training_step_matches_pytorch():
    model = lenet_bn(0)
    tm = torch_lenet_bn()
    tm.load_state_dict(to_torch_state(model))
    x, y = _batch(128, seed=1)
    lr = 0.9
    opt = SGD(model.parameters(), lr=lr, momentum=0.5, weight_decay=1e-3)
    topt = torch.optim.SGD(tm.parameters(), lr=lr, momentum=0.5, weight_decay=1e-3)

    loss_fn = nn.CrossEntropyLoss()
    loss = loss_fn(model(x), y)
    model.backward(loss_fn.backward())
    tloss = t.functional.cross_entropy(tm(torch.from_numpy(x)), torch.from_numpy(y))
    tloss.backward()
    assert loss == pytest.approx(tloss.item(), rel=1e-5)
    grads = {name: p.grad for name, p in model.named_parameters()}
    for name, tp in tm.named_parameters():
        g, tg = grads[name], tp.grad.numpy()
        if name in PRE_BN_BIASES:
            # the true gradient is exactly 0 (BN removes the mean): both are rounding noise
            weight_scale = np.abs(grads[name.replace("bias", "weight")]).max()
            assert np.abs(g).max() < 1e-2 * weight_scale, name
            continue
        # relative to the largest entry: float32 sums of 128·576 terms differ by ~1e-5
        scale = np.abs(tg).max()
        np.testing.assert_allclose(g / scale, tg / scale, atol=1e-4, err_msg=name)
    opt.step()
    topt.step()
    tsd = tm.state_dict()
    for k, v in model.state_dict().items():
        np.testing.assert_allclose(v, tsd[k].numpy(), rtol=2e-5, atol=2e-6, err_msg=k)
