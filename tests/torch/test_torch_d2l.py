"""d2l's from-scratch BatchNorm: explicit training flag, stats in state_dict, LeNet-BN trains;
d2l's positional signature, the grad-mode inference (warned once), both momentum meanings, and a
d2l state_dict without moving statistics."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import bnlab  # noqa: E402
import bnlab.torch as bt  # noqa: E402
from bnlab.errors import NonFiniteBatchWarning, ShapeError  # noqa: E402
from bnlab.torch import d2l  # noqa: E402
from bnlab.torch.models import lenet_bn  # noqa: E402


def _d2l_inputs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    vec = (1, c) if len(shape) == 2 else (1, c, 1, 1)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1
    gamma = torch.rand(vec, generator=g, dtype=torch.float64) + 0.5
    beta = torch.randn(vec, generator=g, dtype=torch.float64)
    mm, mv = torch.randn(vec, dtype=torch.float64), torch.rand(vec, dtype=torch.float64) + 0.5
    return x, gamma, beta, mm, mv


@pytest.mark.parametrize("shape", [(6, 4), (5, 3, 2, 4)])
def test_training_matches_torch_functional_and_d2l_momentum(shape):
    x, gamma, beta, mm, mv = _d2l_inputs(shape)
    y, new_mm, new_mv = bt.batch_norm(x, gamma, beta, mm, mv, 1e-5, 0.9, training=True)
    rm, rv = mm.flatten().clone(), mv.flatten().clone()
    expected = nn.functional.batch_norm(
        x, rm, rv, gamma.flatten(), beta.flatten(), training=True, momentum=0.1, eps=1e-5
    )
    torch.testing.assert_close(y, expected)
    dims = (0,) if x.dim() == 2 else (0, 2, 3)
    mean, var = x.mean(dims), x.var(dims, correction=0)  # d2l: biased moving variance
    torch.testing.assert_close(new_mm.flatten(), 0.9 * mm.flatten() + 0.1 * mean)
    torch.testing.assert_close(new_mv.flatten(), 0.9 * mv.flatten() + 0.1 * var)
    assert new_mm.shape == mm.shape and not new_mm.requires_grad


@pytest.mark.parametrize("shape", [(6, 4), (5, 3, 2, 4)])
def test_inference_uses_moving_statistics_even_with_grad_enabled(shape):
    """d2l's trap: it picks the mode from torch.is_grad_enabled(); here the flag decides."""
    x, gamma, beta, mm, mv = _d2l_inputs(shape)
    x.requires_grad_()
    y, out_mm, out_mv = bt.batch_norm(x, gamma, beta, mm, mv, 1e-5, 0.9, training=False)
    torch.testing.assert_close(y, gamma * (x - mm) / torch.sqrt(mv + 1e-5) + beta)
    assert torch.equal(out_mm, mm) and torch.equal(out_mv, mv)
    dy = torch.randn(shape, dtype=torch.float64)
    y.backward(dy)
    torch.testing.assert_close(x.grad, dy * gamma / torch.sqrt(mv + 1e-5))


def test_gradients_match_autograd_of_torch_batch_norm():
    x, gamma, beta, mm, mv = _d2l_inputs((5, 3, 2, 2))
    dy = torch.randn(5, 3, 2, 2, dtype=torch.float64)
    grads = []
    for use_d2l in (True, False):
        xs, gs, bs = (t.clone().requires_grad_() for t in (x, gamma, beta))
        if use_d2l:
            y = bt.batch_norm(xs, gs, bs, mm, mv, 1e-5, 0.9, training=True)[0]
        else:
            y = nn.functional.batch_norm(
                xs, None, None, gs.flatten(), bs.flatten(), training=True, eps=1e-5
            )
        y.backward(dy)
        grads.append((xs.grad, gs.grad.flatten(), bs.grad.flatten()))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(
        lambda x, g, b: bt.batch_norm(x, g, b, mm, mv, 1e-5, 0.9, training=True)[0],
        (x[:, :, :1].clone().requires_grad_(), gamma.requires_grad_(), beta.requires_grad_()),
    )


def test_bad_arguments_are_clear_errors():
    x, gamma, beta, mm, mv = _d2l_inputs((4, 3, 2, 2))
    with pytest.raises(ShapeError, match="2-D"):
        bt.batch_norm(x[:, :, 0], gamma, beta, mm, mv, 1e-5, 0.9, training=True)
    with pytest.raises(TypeError, match="training"):
        bt.batch_norm(x, gamma, beta, mm, mv, 1e-5, 0.9, training="yes")
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
        bt.batch_norm(x, gamma, beta, mm, mv, 1e-5, 1.5, training=True)
    with pytest.raises(TypeError, match="momentum must be a float"):
        bt.batch_norm(x, gamma, beta, mm, mv, 1e-5, "0.9", training=True)
    with pytest.raises(ValueError, match="convention must be one of"):
        bt.batch_norm(x, gamma, beta, mm, mv, 1e-5, 0.9, training=True, convention="d2l-2")
    with pytest.raises(ValueError, match="num_dims"):
        bt.BatchNorm(3, num_dims=3)


def test_module_registers_moving_statistics_as_buffers():
    m = bt.BatchNorm(3, num_dims=4)
    assert set(m.state_dict()) == {"gamma", "beta", "moving_mean", "moving_var"}
    ptr = m.moving_mean.data_ptr()
    m(torch.randn(4, 3, 2, 2) + 5)
    assert m.moving_mean.data_ptr() == ptr  # updated in place
    assert (m.moving_mean > 0.3).all()
    other = bt.BatchNorm(3, num_dims=4)
    other.load_state_dict(m.state_dict())
    other.eval(), m.eval()
    x = torch.randn(2, 3, 2, 2)
    torch.testing.assert_close(other(x), m(x))
    m64 = m.double()
    assert m64.moving_var.dtype == torch.float64  # buffers move with the module


def test_module_mode_comes_from_train_eval_not_grad_mode():
    m = bt.BatchNorm(3, num_dims=2).eval()
    before = m.moving_mean.clone()
    m(torch.randn(8, 3) + 4)  # grad enabled, but eval: moving stats untouched
    assert torch.equal(m.moving_mean, before)
    with torch.no_grad():
        m.train()(torch.randn(8, 3) + 4)  # no grad, but training: they move
    assert not torch.equal(m.moving_mean, before)


def test_d2l_lenet_bn_trains_and_keeps_moving_statistics(one_thread):
    torch.manual_seed(0)
    model = lenet_bn("d2l", seed=0)
    g = torch.Generator().manual_seed(3)
    # a learnable synthetic task: the class is the brightest of 10 horizontal bands
    labels = torch.randint(0, 10, (128,), generator=g)
    x = torch.rand(128, 1, 28, 28, generator=g) * 0.5
    for i, c in enumerate(labels.tolist()):
        x[i, 0, 2 * c + 4 : 2 * c + 6] += 1.0
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    loss_fn = nn.CrossEntropyLoss()
    losses = []
    for step in range(30):
        idx = torch.arange(32) + 32 * (step % 4)
        opt.zero_grad()
        loss = loss_fn(model(x[idx]), labels[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4, losses
    sd = model.state_dict()
    assert {"1.moving_mean", "1.moving_var", "10.moving_mean", "13.moving_var"} <= set(sd)
    assert not torch.equal(sd["1.moving_mean"], torch.zeros_like(sd["1.moving_mean"]))
    model.eval()
    acc = (model(x).argmax(1) == labels).float().mean()
    assert acc > 0.5


@pytest.mark.parametrize("norm", ["bnlab", "torch"])
def test_lenet_bn_state_dict_matches_numpy_engine_keys(norm):
    keys = list(lenet_bn(norm).state_dict())
    try:
        from bnlab.models import lenet_bn as numpy_lenet_bn
    except ImportError:
        pytest.skip("bnlab.models.lenet_bn not available")
    assert keys == list(numpy_lenet_bn().state_dict())


def test_module_keeps_moving_statistics_on_a_nonfinite_batch():
    from bnlab.errors import NonFiniteBatchWarning

    m = bt.BatchNorm(3, num_dims=4)
    m(torch.randn(4, 3, 2, 2))
    before = {k: v.clone() for k, v in m.state_dict().items() if k.startswith("moving")}
    x = torch.randn(4, 3, 2, 2)
    x[0, 1, 0, 0] = float("inf")
    with pytest.warns(NonFiniteBatchWarning):
        m(x)
    for k, v in before.items():
        assert torch.equal(m.state_dict()[k], v), k


# --------------------------------------------------------------------------- d2l's own signature


def test_mode_from_grad_mode_is_reachable_and_warned_once(monkeypatch):
    """Without training= the mode follows torch.is_grad_enabled() (d2l's drop-in), with one
    warning per process that says what it costs and how to pass training=."""
    monkeypatch.setitem(d2l._warned, "grad_mode", False)
    x, gamma, beta, mm, mv = _d2l_inputs((6, 3))
    with pytest.warns(d2l.GradModeWarning, match=r"training=self\.training") as rec:
        y_train, new_mm, _ = bt.batch_norm(x, gamma, beta, mm, mv, 1e-5, 0.9)
    assert "moves the moving averages even in evaluation" in str(rec[0].message)
    assert rec[0].filename == __file__  # points at the caller's line
    torch.testing.assert_close(y_train, bt.batch_norm(x, gamma, beta, mm, mv, 1e-5, 0.9,
                                                      training=True)[0])  # fmt: skip
    assert not torch.equal(new_mm, mm)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: no second warning
        with torch.no_grad():
            y_eval, same_mm, _ = bt.batch_norm(x, gamma, beta, mm, mv, 1e-5, 0.9)
    torch.testing.assert_close(y_eval, gamma * (x - mm) / torch.sqrt(mv + 1e-5) + beta)
    assert torch.equal(same_mm, mm)


def test_explicit_training_never_warns(monkeypatch):
    monkeypatch.setitem(d2l._warned, "grad_mode", False)
    x, gamma, beta, mm, mv = _d2l_inputs((6, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bt.batch_norm(x, gamma, beta, mm, mv, 1e-5, 0.9, training=False)
        d2l.batch_norm_v1(x, gamma, beta, mm, mv, 1e-5, 0.1, training=True)


def _one_batch_of_mean(value, shape=(64, 3)):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 0.01
    return x - x.mean(0) + value  # channel means exactly `value`


@pytest.mark.parametrize("fn,momentum,expected,warns", [
    (d2l.batch_norm_v1, 0.1, 0.114, False),  # d2l 1.0 with its own default
    (bt.batch_norm, 0.9, 0.114, False),  # the older text with its own default
    (bt.batch_norm, 0.1, 1.026, True),  # a d2l 1.0 value under the older meaning
    (d2l.batch_norm_v1, 0.9, 1.026, True),  # and the other way round
])  # fmt: skip
def test_both_d2l_momentum_meanings(fn, momentum, expected, warns):
    x = _one_batch_of_mean(1.14)
    zeros, ones = torch.zeros(1, 3, dtype=torch.float64), torch.ones(1, 3, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        _, mm, _ = fn(x, ones, zeros, zeros, ones, 1e-5, momentum, training=True)
    torch.testing.assert_close(mm, torch.full((1, 3), expected, dtype=torch.float64))
    meaning = [w for w in rec if issubclass(w.category, d2l.MomentumMeaningWarning)]
    assert len(meaning) == int(warns)
    if warns:
        other = "d2l-1.0" if fn is bt.batch_norm else "d2l-0.17"
        assert f"convention={other!r}" in str(meaning[0].message)
        assert meaning[0].filename == __file__


def test_module_presets_and_lookalike_warning():
    old, new = bt.BatchNorm(3, 2), bt.BatchNorm(3, 2, convention="d2l-1.0")
    assert (old.momentum, new.momentum) == (0.9, 0.1)
    x = torch.randn(16, 3) * 2 + 1
    for m in (old, new):
        for _ in range(3):
            m(x)
    torch.testing.assert_close(old.moving_mean, new.moving_mean)
    torch.testing.assert_close(old.moving_var, new.moving_var)
    with pytest.warns(d2l.MomentumMeaningWarning, match="d2l-1.0"):
        bt.BatchNorm(3, 2, momentum=0.1)
    assert "d2l-1.0" in repr(new)


def test_pytorch_preset_keeps_an_unbiased_moving_variance():
    x, gamma, beta, mm, mv = _d2l_inputs((6, 4))
    _, _, new_mv = bt.batch_norm(x, gamma, beta, mm, mv, 1e-5, 0.1, training=True,
                                 convention="pytorch")  # fmt: skip
    torch.testing.assert_close(new_mv.flatten(), 0.9 * mv.flatten() + 0.1 * x.var(0))


def test_function_returns_moving_statistics_unchanged_for_a_nonfinite_batch():
    """The chapter's class assigns what batch_norm returns: a NaN batch must not come back."""
    x, gamma, beta, mm, mv = _d2l_inputs((5, 3, 2, 2))
    x[1, 2, 0, 1] = float("nan")
    with pytest.warns(NonFiniteBatchWarning, match="returned unchanged") as rec:
        _, new_mm, new_mv = bt.batch_norm(x, gamma, beta, mm, mv, 1e-5, 0.9, training=True)
    assert rec[0].filename == __file__
    assert torch.equal(new_mm, mm) and torch.equal(new_mv, mv)


# --------------------------------------------------------------------------- d2l state_dicts


def _d2l_state_dict(model):
    """What a d2l LeNet-BN saves: its BatchNorm's gamma/beta, never moving_mean/moving_var."""
    return {k: v for k, v in model.state_dict().items() if "moving" not in k}


def test_loading_a_d2l_state_dict_explains_and_points_to_recalibrate():
    trained = lenet_bn("d2l", seed=1)
    sd = _d2l_state_dict(trained)
    model = lenet_bn("d2l", seed=2)
    with pytest.raises(RuntimeError, match="never saves them") as err:
        model.load_state_dict(sd)
    message = str(err.value)
    assert message.count("bnlab.recalibrate(model, batches)") == 1  # once, not per layer
    assert "1.moving_mean" in message  # PyTorch's own list of missing keys is still there
    with pytest.warns(d2l.MissingMovingStatisticsWarning, match="bnlab.recalibrate"):
        result = model.load_state_dict(sd, strict=False)
    assert "1.moving_mean" in result.missing_keys
    torch.testing.assert_close(model[0].weight, trained[0].weight)


def test_recalibrate_fills_the_moving_statistics_of_d2l_modules():
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(32, 1, 28, 28, generator=g) for _ in range(3)]
    model = lenet_bn("d2l", seed=0)
    before = model.state_dict()["0.weight"].clone()
    summary = bnlab.recalibrate(model, batches)
    assert summary.layers == ["1", "5", "10", "13"]
    assert torch.equal(model.state_dict()["0.weight"], before)
    # the first BN sees conv(x): its population mean is the mean of the batch means
    with torch.no_grad():
        feats = [model[0](b) for b in batches]
    expected = torch.stack([f.double().mean(dim=(0, 2, 3)) for f in feats]).mean(0)
    np.testing.assert_allclose(model[1].moving_mean.flatten().numpy(), expected.numpy(), rtol=1e-5)
    assert model.training  # flags restored
