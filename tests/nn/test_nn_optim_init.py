"""SGD against torch.optim.SGD over several steps; seeded initialisation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bnlab import init, nn
from bnlab.errors import ShapeError
from bnlab.models import lenet_bn
from bnlab.optim import SGD


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"momentum": 0.9},
        {"momentum": 0.9, "dampening": 0.1, "weight_decay": 1e-2},
        {"momentum": 0.8, "nesterov": True, "weight_decay": 5e-3},
    ],
)
def test_sgd_matches_torch_over_steps(kw):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((4, 3))
    p = nn.Parameter(w0.copy())
    tp = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt, topt = SGD([p], lr=0.1, **kw), torch.optim.SGD([tp], lr=0.1, **kw)
    for _ in range(4):
        g = rng.standard_normal((4, 3))
        p.grad = g.copy()
        tp.grad = torch.from_numpy(g.copy())
        opt.step()
        topt.step()
    np.testing.assert_allclose(p.data, tp.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_sgd_state_dict_roundtrip_continues_identically():
    rng = np.random.default_rng(1)
    grads = [rng.standard_normal(3) for _ in range(4)]
    a = nn.Parameter(np.ones(3))
    oa = SGD([a], lr=0.5, momentum=0.9)
    for g in grads:
        a.grad = g
        oa.step()
    b = nn.Parameter(np.ones(3))
    ob = SGD([b], lr=0.5, momentum=0.9)
    for g in grads[:2]:
        b.grad = g
        ob.step()
    c = nn.Parameter(b.data.copy())
    oc = SGD([c], lr=0.5, momentum=0.9)
    oc.load_state_dict(ob.state_dict())
    for g in grads[2:]:
        c.grad = g
        oc.step()
    np.testing.assert_array_equal(a.data, c.data)


def test_sgd_bad_arguments():
    p = nn.Parameter(np.zeros(2))
    with pytest.raises(ValueError, match="lr"):
        SGD([p], lr=0)
    with pytest.raises(ValueError, match="momentum"):
        SGD([p], lr=0.1, momentum=-1)
    with pytest.raises(ValueError, match="empty"):
        SGD([], lr=0.1)
    with pytest.raises(ValueError, match="nesterov"):
        SGD([p], lr=0.1, nesterov=True)
    opt = SGD([p], lr=0.1)
    with pytest.raises(ShapeError):
        opt.load_state_dict({"momentum_buffer.0": np.zeros(3)})
    with pytest.raises(KeyError):
        opt.load_state_dict({"momentum_buffer.5": np.zeros(2)})


def test_xavier_uniform_bound_and_seed():
    w = np.empty((16, 6, 5, 5), np.float32)
    init.xavier_uniform_(w, rng=np.random.default_rng(0))
    bound = math.sqrt(6 / (6 * 25 + 16 * 25))
    assert np.abs(w).max() <= bound
    assert np.abs(w).max() > 0.95 * bound  # it fills the range
    assert abs(w.std() - bound / math.sqrt(3)) < 0.05 * bound  # U(-a, a) has std a/sqrt(3)
    w2 = np.empty_like(w)
    init.xavier_uniform_(w2, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(w, w2)


def test_models_are_seeded():
    a, b, c = lenet_bn(3), lenet_bn(3), lenet_bn(4)
    np.testing.assert_array_equal(a[0].weight.data, b[0].weight.data)
    assert not np.array_equal(a[0].weight.data, c[0].weight.data)
    init.manual_seed(5)
    x = nn.Linear(3, 3).weight.data.copy()
    init.manual_seed(5)
    np.testing.assert_array_equal(x, nn.Linear(3, 3).weight.data)
