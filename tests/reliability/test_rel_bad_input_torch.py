"""Bad inputs to bnlab.torch: PyTorch's behaviour where PyTorch defines it, buffers untouched.

Each hostile input is also fed to ``torch.nn.BatchNorm*d``: bnlab raises the *same exception type*
(code written against PyTorch keeps working), with a message naming what was expected.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from reliability_helpers import expect_clean_error, snapshot

torch = pytest.importorskip("torch")
import bnlab.torch as bt  # noqa: E402
from bnlab.errors import NonFiniteBatchWarning  # noqa: E402

FAMILY = "bad input: bnlab.torch"


def _pair(cls_name="BatchNorm2d", c=3, **kw):
    """A torch BN and bnlab's, with identical non-trivial buffers."""
    torch.manual_seed(0)
    ref = getattr(torch.nn, cls_name)(c, **kw)
    ours = getattr(bt, cls_name)(c, **kw)
    shape = (6, c, 3, 3) if cls_name == "BatchNorm2d" else (6, c)
    warm = torch.randn(shape)
    ref(warm)
    ours(warm)
    return ref, ours


HOSTILE = {
    "wrong-ndim": ("BatchNorm2d", lambda: torch.randn(4, 3, 5), ["expected 4D input"]),
    "channel-mismatch": (
        "BatchNorm2d",
        lambda: torch.randn(4, 5, 2, 2),
        ["running_mean", "5 elements not 3"],
    ),
    "one-value-per-channel": ("BatchNorm1d", lambda: torch.randn(1, 3), ["more than 1 value"]),
    "integer-input": ("BatchNorm2d", lambda: torch.ones(4, 3, 2, 2, dtype=torch.int64), ["Long"]),
    "bool-input": ("BatchNorm1d", lambda: torch.ones(4, 3, dtype=torch.bool), ["Bool"]),
    "1d-input": ("BatchNorm1d", lambda: torch.randn(3), ["2D or 3D input"]),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_same_exception_type_as_pytorch_and_buffers_untouched(name):
    cls_name, make, needles = HOSTILE[name]
    ref, ours = _pair(cls_name)
    x = make()
    with pytest.raises(Exception) as ref_err:
        ref(x)
    expect_clean_error(lambda: ours(x), type(ref_err.value), needles, [ours])


def test_zero_size_batch_returns_empty_and_leaves_statistics_alone():
    """PyTorch returns an empty output; bnlab too, and also leaves num_batches_tracked alone."""
    ref, ours = _pair()
    before = snapshot(ours)
    x = torch.randn(0, 3, 4, 4)
    y_ref, y = ref(x), ours(x)
    assert y.shape == y_ref.shape == (0, 3, 4, 4)
    assert snapshot(ours) == before
    torch.testing.assert_close(ours.running_mean, ref.running_mean)


def test_zero_size_batch_backward_gives_empty_grad():
    _, ours = _pair()
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    ours(x).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("training", [True, False])
def test_track_running_stats_false_never_touches_buffers(training):
    ref, ours = _pair(track_running_stats=False)
    ours.train(training)
    ref.train(training)
    x = torch.randn(5, 3, 2, 2)
    assert ours.running_mean is None and ours.num_batches_tracked is None
    before = snapshot(ours)
    torch.testing.assert_close(ours(x), ref(x))
    assert snapshot(ours) == before


def test_nonfinite_batch_never_reaches_the_buffers():
    """Stricter than PyTorch (which averages the NaN in): a NonFiniteBatchWarning, no update."""
    _, ours = _pair()
    before = snapshot(ours)
    x = torch.randn(4, 3, 2, 2)
    x[2, 1, 0, 0] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours(x)
    assert any(issubclass(w.category, NonFiniteBatchWarning) for w in caught)
    assert snapshot(ours) == before


def test_eval_without_running_stats_in_functional():
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="running_mean must be defined"):
        bt.functional.batch_norm(x, None, None, training=False)


def test_functional_rejects_bad_momentum_and_eps_without_touching_buffers():
    """Stricter than F.batch_norm, which accepts momentum=5 or eps=-1 silently."""
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    x = torch.randn(4, 3)
    for kwargs, needle in (({"momentum": 5.0}, "momentum"), ({"eps": -1.0}, "eps")):
        before = (rm.clone(), rv.clone())
        with pytest.raises(ValueError, match=needle):
            bt.functional.batch_norm(x, rm, rv, training=True, **kwargs)
        assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])


def test_d2l_batch_norm_needs_an_explicit_bool_training_flag():
    g, b = torch.ones(1, 3), torch.zeros(1, 3)
    mm, mv = torch.zeros(1, 3), torch.ones(1, 3)
    with pytest.raises(TypeError, match="training must be True or False"):
        bt.batch_norm(torch.randn(4, 3), g, b, mm, mv, 1e-5, 0.9, training="yes")
    with pytest.raises(ValueError, match="X must be 2-D"):
        bt.batch_norm(torch.randn(4, 3, 2), g, b, mm, mv, 1e-5, 0.9, training=True)
    assert torch.equal(mm, torch.zeros(1, 3)) and torch.equal(mv, torch.ones(1, 3))


def test_numpy_input_is_refused_by_the_torch_module():
    _, ours = _pair()
    with pytest.raises((TypeError, AttributeError)):
        ours(np.ones((4, 3, 2, 2), np.float32))


def test_sync_batch_norm_without_a_process_group():
    m = bt.SyncBatchNorm(3)
    expect_clean_error(
        lambda: m(torch.randn(4, 3, 2, 2)), RuntimeError, ["init_process_group", "BatchNorm2d"], [m]
    )
    m.eval()  # eval needs no communication
    assert m(torch.randn(4, 3, 2, 2)).shape == (4, 3, 2, 2)
