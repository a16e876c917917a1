"""BatchRenorm1d/2d and GhostBatchNorm1d/2d modules: thin bookkeeping over the functional math,
BatchNorm's state_dict and inference, the warm-up schedule driven by num_batches_tracked, and
agreement with PyTorch (state_dict loads into torch.nn.BatchNorm2d, gradients vs autograd)."""

from __future__ import annotations

import numpy as np
import pytest

from bnlab.functional.ghost import ghost_batch_norm_forward
from bnlab.functional.renorm import RenormSchedule, batch_renorm_forward
from bnlab.nn import BatchNorm1d, BatchNorm2d
from bnlab.nn.ghost import GhostBatchNorm1d, GhostBatchNorm2d
from bnlab.nn.renorm import BatchRenorm1d, BatchRenorm2d


def _steps(mod, xs, dys):
    """Training forwards + backwards; returns outputs, input grads and (dγ, dβ) per step."""
    out = []
    for x, dy in zip(xs, dys, strict=True):
        mod.zero_grad()
        y = mod(x)
        dx = mod.backward(dy)
        out.append((y, dx, mod.weight.grad.copy(), mod.bias.grad.copy()))
    return out


@pytest.mark.parametrize(
    "bn_cls,rn_cls,shape",
    [(BatchNorm2d, BatchRenorm2d, (6, 3, 4, 4)), (BatchNorm1d, BatchRenorm1d, (8, 5))],
)
def test_renorm_module_with_rmax1_dmax0_trains_like_batch_norm(rng, bn_cls, rn_cls, shape):
    c = shape[1]
    xs = [rng.standard_normal(shape) * (k + 1) + k for k in range(3)]
    dys = [rng.standard_normal(shape) for _ in range(3)]
    bn = bn_cls(c, dtype=np.float64)
    rn = rn_cls(c, dtype=np.float64, rmax=1.0, dmax=0.0)
    for a, b in zip(_steps(bn, xs, dys), _steps(rn, xs, dys), strict=True):
        for u, w in zip(a, b, strict=True):
            np.testing.assert_allclose(w, u, rtol=1e-11, atol=1e-12)
    for key, val in bn.state_dict().items():
        np.testing.assert_allclose(rn.state_dict()[key], val, rtol=1e-13)
    assert list(rn.state_dict()) == list(bn.state_dict())


def test_renorm_module_is_the_functional_forward(rng):
    x = rng.standard_normal((5, 3, 2, 2)) * 2 + 1
    m = BatchRenorm2d(3, dtype=np.float64, rmax=1.5, dmax=0.5)
    m.running_mean[...] = [0.5, -1.0, 3.0]
    m.running_var[...] = [0.5, 4.0, 1.0]
    rm, rv = m.running_mean.copy(), m.running_var.copy()
    y = m(x)
    y_f, _ = batch_renorm_forward(
        x, np.ones(3), np.zeros(3), training=True, running_mean=rm, running_var=rv, rmax=1.5,
        dmax=0.5, momentum=0.1,
    )  # fmt: skip
    np.testing.assert_allclose(y, y_f, rtol=1e-13)
    np.testing.assert_allclose(m.running_var, rv, rtol=1e-13)
    assert int(m.num_batches_tracked) == 1
    m.eval()
    ref = BatchNorm2d(3, dtype=np.float64).eval()
    ref.load_state_dict(m.state_dict())
    np.testing.assert_allclose(m(x), ref(x), rtol=1e-13)


def test_schedule_follows_num_batches_tracked(rng):
    sched = RenormSchedule(rmax=3.0, dmax=2.0, warmup_steps=2, rmax_full_step=6, dmax_full_step=4)
    m = BatchRenorm1d(4, dtype=np.float64, schedule=sched)
    seen = []
    for _ in range(7):
        seen.append(m.current_limits())
        m(rng.standard_normal((6, 4)))
    assert seen == [sched(k) for k in range(7)]
    assert seen[0] == (1.0, 0.0) and seen[6] == (3.0, 2.0)
    # a resumed module continues the ramp from the saved counter
    m2 = BatchRenorm1d(4, dtype=np.float64, schedule=sched)
    m2.load_state_dict(m.state_dict())
    assert m2.current_limits() == sched(7)


def test_renorm_state_dict_loads_into_torch_batchnorm(rng):
    torch = pytest.importorskip("torch")
    m = BatchRenorm2d(3, dtype=np.float64, rmax=2.0, dmax=1.0)
    for _ in range(3):
        m(rng.standard_normal((4, 3, 3, 3)) + 2)
    t = torch.nn.BatchNorm2d(3).double().eval()
    t.load_state_dict({k: torch.from_numpy(v) for k, v in m.state_dict().items()})
    x = rng.standard_normal((2, 3, 3, 3))
    np.testing.assert_allclose(m.eval()(x), t(torch.from_numpy(x)).detach().numpy(), rtol=1e-12)


@pytest.mark.parametrize(
    "bn_cls,gh_cls,shape",
    [(BatchNorm2d, GhostBatchNorm2d, (6, 3, 2, 2)), (BatchNorm1d, GhostBatchNorm1d, (8, 5))],
)
def test_ghost_module_with_whole_batch_trains_like_batch_norm(rng, bn_cls, gh_cls, shape):
    c = shape[1]
    xs = [rng.standard_normal(shape) + k for k in range(3)]
    dys = [rng.standard_normal(shape) for _ in range(3)]
    bn = bn_cls(c, dtype=np.float64)
    gh = gh_cls(c, shape[0], dtype=np.float64)
    for a, b in zip(_steps(bn, xs, dys), _steps(gh, xs, dys), strict=True):
        for u, w in zip(a, b, strict=True):
            np.testing.assert_allclose(w, u, rtol=1e-12, atol=1e-13)
    assert list(gh.state_dict()) == list(bn.state_dict())
    for key, val in bn.state_dict().items():
        np.testing.assert_allclose(gh.state_dict()[key], val, rtol=1e-13)
    bn.eval(), gh.eval()
    np.testing.assert_array_equal(gh(xs[0]), bn(xs[0]))


@pytest.mark.parametrize("running_update", ["mean", "sequential"])
def test_ghost_module_is_the_functional_forward(rng, running_update):
    x = rng.standard_normal((10, 3, 2, 2))
    m = GhostBatchNorm2d(3, 4, dtype=np.float64, running_update=running_update)
    rm, rv, nbt = np.zeros(3), np.ones(3), np.array(0)
    y_f, _ = ghost_batch_norm_forward(
        x, np.ones(3), np.zeros(3), training=True, virtual_batch_size=4, running_mean=rm,
        running_var=rv, num_batches_tracked=nbt, running_update=running_update,
    )  # fmt: skip
    np.testing.assert_allclose(m(x), y_f, rtol=1e-14)
    np.testing.assert_allclose(m.running_mean, rm, rtol=1e-14)
    np.testing.assert_allclose(m.running_var, rv, rtol=1e-14)
    assert int(m.num_batches_tracked) == int(nbt)


def test_ghost_module_gradients_match_torch_autograd(rng):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((10, 3, 2, 3))
    dy = rng.standard_normal(x.shape)
    m = GhostBatchNorm2d(3, 4, dtype=np.float64)
    m.weight.data[...] = rng.uniform(0.5, 1.5, 3)
    m.bias.data[...] = rng.standard_normal(3)
    y = m(x)
    dx = m.backward(dy)
    tx = torch.tensor(x, requires_grad=True)
    tg = torch.tensor(m.weight.data, requires_grad=True)
    tb = torch.tensor(m.bias.data, requires_grad=True)
    F = torch.nn.functional
    ty = torch.cat([F.batch_norm(c, None, None, tg, tb, True, 0.0, 1e-5) for c in tx.split(4)])
    ty.backward(torch.tensor(dy))
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(m.weight.grad, tg.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(m.bias.grad, tb.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_ghost_without_running_stats_uses_virtual_batches_in_eval(rng):
    x = rng.standard_normal((8, 2, 2, 2)) + np.arange(8).reshape(-1, 1, 1, 1)
    m = GhostBatchNorm2d(2, 4, track_running_stats=False, dtype=np.float64).eval()
    y_f, _ = ghost_batch_norm_forward(x, None, None, training=True, virtual_batch_size=4)
    np.testing.assert_allclose(m(x), y_f, rtol=1e-14)


@pytest.mark.reliability
def test_module_bad_arguments():
    with pytest.raises(ValueError, match="rmax must be >= 1"):
        BatchRenorm2d(3, rmax=0.5)
    with pytest.raises(ValueError, match="dmax must be >= 0"):
        BatchRenorm1d(3, dmax=-1)
    with pytest.raises(ValueError, match="track_running_stats must be True"):
        BatchRenorm2d(3, track_running_stats=False)
    with pytest.raises(TypeError, match="schedule must be a RenormSchedule"):
        BatchRenorm2d(3, schedule=(3, 5))
    with pytest.raises(ValueError, match="virtual_batch_size must be >= 1"):
        GhostBatchNorm2d(3, 0)
    with pytest.raises(TypeError, match="virtual_batch_size must be a positive integer"):
        GhostBatchNorm1d(3, 2.0)
    with pytest.raises(ValueError, match="running_update must be one of"):
        GhostBatchNorm1d(3, 2, running_update="avg")
