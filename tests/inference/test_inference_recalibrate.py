"""recalibrate: the formulas against a direct computation, pooled statistics, NaN batches."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from bnlab import nn
from bnlab.models import lenet_bn
from bnlab.recalibrate import pooled_statistics, population_statistics, recalibrate


@pytest.fixture
def batches(rng):
    """Five equal-size batches with a shifted mean (so population != initial stats)."""
    return [(rng.standard_normal((6, 1, 28, 28)) * 2 + 0.5).astype(np.float32) for _ in range(5)]


def _bn_inputs(model, prefix_len: int, batches) -> list[np.ndarray]:
    """The input of ``model[prefix_len]`` for every batch, with every BN before it normalizing by
    its batch statistics (training mode) - computed on a throwaway copy, in float64."""
    prefix = copy.deepcopy(model)[:prefix_len].to(np.float64).train()
    with nn.no_grad():
        return [prefix(b.astype(np.float64)) for b in batches]


def _per_channel(h: np.ndarray) -> np.ndarray:
    """(N, C, ...) -> (C, N·...) rows of one channel's values."""
    return np.moveaxis(h, 1, 0).reshape(h.shape[1], -1)


@pytest.mark.parametrize("bn_index", [1, 5, 10])  # first conv BN, second conv BN, a BN1d
def test_population_matches_the_textbook_definition(batches, bn_index):
    model = lenet_bn(seed=0).eval()
    summary = recalibrate(model, batches, method="population")
    inputs = [_per_channel(h) for h in _bn_inputs(model, bn_index, batches)]
    m = inputs[0].shape[1]
    mu = np.mean([h.mean(axis=1) for h in inputs], axis=0)
    var = m / (m - 1) * np.mean([h.var(axis=1) for h in inputs], axis=0)
    bn = model[bn_index]
    np.testing.assert_allclose(bn.running_mean, mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.running_var, var, rtol=1e-5, atol=1e-6)
    assert summary.batches_used == 5 and summary.batches_skipped == 0
    assert str(bn_index) in summary.layers and not model.training


@pytest.mark.parametrize("bn_index", [1, 5])
def test_precise_is_the_pooled_statistics_of_the_pass(rng, bn_index):
    sizes = [3, 7, 4]  # unequal batches: precise must weight by count
    data = [rng.standard_normal((n, 1, 28, 28)).astype(np.float32) + 1.0 for n in sizes]
    model = lenet_bn(seed=1).eval()
    recalibrate(model, [(x, None) for x in data], method="precise")  # (x, y) pairs accepted
    allv = np.concatenate([_per_channel(h) for h in _bn_inputs(model, bn_index, data)], axis=1)
    np.testing.assert_allclose(model[bn_index].running_mean, allv.mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose(model[bn_index].running_var, allv.var(axis=1, ddof=1), rtol=1e-5)


def test_formulas_on_synthetic_batches(rng):
    parts = [rng.standard_normal((3, n)) * 3 + 10 for n in (5, 5, 5)]
    args = ([p.mean(1) for p in parts], [p.var(1) for p in parts], [5, 5, 5])
    mu, var = population_statistics(*args)
    np.testing.assert_allclose(mu, np.mean([p.mean(1) for p in parts], axis=0))
    np.testing.assert_allclose(var, 5 / 4 * np.mean([p.var(1) for p in parts], axis=0))
    mu, var = pooled_statistics(*args)
    allv = np.concatenate(parts, axis=1)
    np.testing.assert_allclose(mu, allv.mean(1))
    np.testing.assert_allclose(var, allv.var(1, ddof=1))


def test_nan_batch_is_skipped_and_counted(batches):
    clean = lenet_bn(seed=0).eval()
    recalibrate(clean, batches)
    poisoned = list(batches)
    poisoned.insert(2, batches[0].copy())
    poisoned[2][0, 0, 3, 3] = np.nan
    model = lenet_bn(seed=0).eval()
    summary = recalibrate(model, poisoned)
    assert (summary.batches_used, summary.batches_skipped, summary.skipped_batches) == (5, 1, [2])
    for a, b in zip(model.state_dict().values(), clean.state_dict().values(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_only_running_statistics_change(batches):
    model = lenet_bn(seed=0).eval()
    model[5].num_batches_tracked[...] = 7
    before = model.state_dict()
    recalibrate(model, batches)
    after = model.state_dict()
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed and all(k.endswith(("running_mean", "running_var")) for k in changed)
    assert not any(m.training for m in model.modules())


def test_bad_input_leaves_the_model_untouched(batches):
    model = lenet_bn(seed=0).eval()
    before = model.state_dict()
    with pytest.raises(ValueError, match="method must be one of"):
        recalibrate(model, batches, method="ema")
    with pytest.raises(ValueError, match="batches is empty"):
        recalibrate(model, [])
    with pytest.raises(ValueError, match="every one had non-finite"):
        recalibrate(model, [np.full((2, 1, 28, 28), np.inf, np.float32)])
    with pytest.raises(TypeError, match="iterable of input batches"):
        recalibrate(model, batches[0])
    with pytest.raises(ValueError, match="no batch-norm layer"):
        recalibrate(nn.Sequential(nn.Linear(3, 2)), [np.zeros((2, 3), np.float32)])
    with pytest.raises(Exception, match="channels"):  # a wrong shape, raised by the model
        recalibrate(model, [np.zeros((2, 3, 28, 28), np.float32)])
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize("method", ["population", "precise"])
def test_torch_model_through_bnlab_torch_matches_bnlab_model(batches, method):
    torch = pytest.importorskip("torch")
    from bnlab.torch.models import lenet_bn as torch_lenet_bn

    tmodel = torch_lenet_bn(norm="bnlab", seed=0).eval()
    bmodel = lenet_bn(seed=0).eval()
    bmodel.load_state_dict({k: v.numpy() for k, v in tmodel.state_dict().items()})
    s1 = recalibrate(tmodel, [torch.from_numpy(b) for b in batches], method=method)
    s2 = recalibrate(bmodel, batches, method=method)
    assert s1.layers == s2.layers and s1.batches_used == 5 and not tmodel.training
    for k, v in tmodel.state_dict().items():
        if k.endswith(("running_mean", "running_var")):
            np.testing.assert_allclose(v.numpy(), bmodel.state_dict()[k], rtol=2e-4, atol=1e-6)
