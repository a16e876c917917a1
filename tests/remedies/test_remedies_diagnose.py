"""bnlab.diagnose: passes a well-trained model, flags corrupted running statistics and shifted
data, its numbers equal a direct computation, bnlab and torch models agree, the model is left
untouched, and output (table, strict JSON, PNG) and bad input behave."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bnlab import nn
from bnlab.diagnose import Thresholds, diagnose, rms_normalized_difference
from bnlab.errors import DTypeError
from bnlab.nn.ghost import GhostBatchNorm1d
from bnlab.optim import SGD

D, K, H = 12, 3, 16
EPS = 1e-5


def _data(seed: int):
    """A fixed Gaussian-mixture task; ``sample(n, shift)`` draws a batch (x float32, labels)."""
    centers = np.random.default_rng(99).standard_normal((K, D)) * 2
    rng = np.random.default_rng(seed)

    def sample(n=64, shift=0.0):
        y = rng.integers(0, K, n)
        return (centers[y] + rng.standard_normal((n, D)) + shift).astype(np.float32), y

    return sample


def _mlp(seed=0, bn2=None):
    """Linear-BN-ReLU x2 + Linear. The NumPy backend: diagnose does not depend on the backend,
    and numba's first-call compilation would dominate this file's run time."""
    r = np.random.default_rng(seed)
    bn2 = bn2 if bn2 is not None else nn.BatchNorm1d(H, backend="numpy")
    return nn.Sequential(
        nn.Linear(D, H, rng=r), nn.BatchNorm1d(H, backend="numpy"), nn.ReLU(),
        nn.Linear(H, H, rng=r), bn2, nn.ReLU(),
        nn.Linear(H, K, rng=r),
    )  # fmt: skip


def _train(model, steps=200, seed=0, lr=0.05):
    sample, loss = _data(seed), nn.CrossEntropyLoss()
    opt = SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(steps):
        x, y = sample()
        opt.zero_grad()
        loss(model(x), y)
        model.backward(loss.backward())
        opt.step()
    # a few more training-mode forwards at the final weights, as at the end of real training
    for _ in range(30):
        model(sample()[0])
    return model.eval()


@pytest.fixture(scope="module")
def trained():
    return _train(_mlp())


def _fresh_copy(model):
    m = _mlp()
    m.load_state_dict(model.state_dict())
    return m.eval()


def test_well_trained_model_passes(trained):
    sample = _data(1)
    d = diagnose(trained, [sample() for _ in range(8)])
    assert d.verdict == "ok", d.format_table()
    assert [lay.verdict for lay in d.layers] == ["ok", "ok"]
    assert all(lay.fold.startswith("safe") for lay in d.layers)
    assert d.prediction_agreement > 0.9


def test_corrupted_running_statistics_are_flagged(trained):
    model = _fresh_copy(trained)
    model[1].running_var[:3] *= 25.0  # variance ratio 1/25 in three channels
    model[4].running_mean[5] = np.nan
    d = diagnose(model, [_data(1)() for _ in range(8)])
    first, second = d.layers
    assert first.verdict == "bad" and any("variance ratio" in p for p in first.problems)
    assert first.worst_var_ratio < 0.1
    assert second.verdict == "bad" and second.nonfinite_channels == [5]
    assert second.fold.startswith("unsafe")
    assert d.verdict == "bad"


def test_shifted_running_mean_is_flagged_in_that_layer_only(trained):
    model = _fresh_copy(trained)
    sigma = np.sqrt(model[4].running_var)
    model[4].running_mean[2] += 3 * sigma[2]
    d = diagnose(model, [_data(1)() for _ in range(8)])
    assert d.layers[0].verdict == "ok"
    assert d.layers[1].verdict == "bad"
    assert abs(d.layers[1].mean_shift_sigma[2]) > 2
    assert any("away from running_mean" in p for p in d.layers[1].problems)


def test_shifted_evaluation_data_is_flagged_at_the_first_layer(trained):
    sample = _data(1)
    d = diagnose(trained, [sample(shift=1.5) for _ in range(8)])
    assert d.layers[0].verdict == "bad"
    assert any("data shift" in a for a in d.layers[0].advice)
    assert d.output_rel_diff > diagnose(trained, [sample() for _ in range(8)]).output_rel_diff


def test_never_trained_model_is_flagged():
    d = diagnose(_mlp().eval(), [_data(1)() for _ in range(2)])
    assert all(lay.verdict == "bad" for lay in d.layers)
    assert any("never updated" in p for p in d.layers[0].problems)


def test_small_batches_are_flagged_as_noisy_with_the_remedies_in_the_advice(trained):
    sample = _data(1)
    d = diagnose(trained, [sample(n=3) for _ in range(30)])
    assert any("noisy" in p for p in d.layers[0].problems)
    assert any("GroupNorm" in a and "Ghost BN" in a for a in d.layers[0].advice)


def test_dead_channels_are_listed(trained):
    model = _fresh_copy(trained)
    model[1].weight.data[[0, 7]] = 0.0
    d = diagnose(model, [_data(1)() for _ in range(2)])
    assert d.layers[0].dead_channels == [0, 7]


# --------------------------------------------------------------------------- exact numbers


def _direct_layer_numbers(rm, rv, inputs):
    """Straight from the captured inputs (N, C) of one layer: pooled statistics and the rms of
    x̂ differences computed on the arrays themselves."""
    allx = np.concatenate(inputs).astype(np.float64)
    mu, var = allx.mean(0), allx.var(0)
    shift = (mu - rm) / np.sqrt(var + EPS)
    te, noise = [], []
    for h in inputs:
        h = h.astype(np.float64)
        xb = (h - h.mean(0)) / np.sqrt(h.var(0) + EPS)
        te.append(((xb - (h - rm) / np.sqrt(rv + EPS)) ** 2).mean(0))
        noise.append(((xb - (h - mu) / np.sqrt(var + EPS)) ** 2).mean(0))
    return shift, var / rv, np.sqrt(np.mean(te)), np.sqrt(np.mean(noise))


def test_numbers_match_a_direct_computation(trained):
    model = _fresh_copy(trained)
    model[4].running_mean[:4] += 0.7  # make the second layer's numbers non-trivial
    sample = _data(2)
    batches = [sample()[0] for _ in range(5)]
    d = diagnose(model, batches)
    layer_inputs = {1: [model[:1](x) for x in batches], 4: [model[:4](x) for x in batches]}
    for lay, idx in zip(d.layers, (1, 4), strict=True):
        rm, rv = model[idx].running_mean.astype(np.float64), model[idx].running_var
        shift, ratio, te, noise = _direct_layer_numbers(
            rm, rv.astype(np.float64), layer_inputs[idx]
        )
        np.testing.assert_allclose(lay.mean_shift_sigma, shift, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(lay.var_ratio, ratio, rtol=1e-6)
        assert lay.train_eval_rms == pytest.approx(te, rel=1e-6)
        assert lay.batch_noise_rms == pytest.approx(noise, rel=1e-6)
        assert lay.max_abs_shift_sigma == pytest.approx(np.abs(shift).max(), rel=1e-6)
    # model level: output with the BN layers in training mode vs eval mode
    train_copy = _fresh_copy(model).train()
    y_t = np.concatenate([train_copy(x) for x in batches]).astype(np.float64)
    y_e = np.concatenate([model(x) for x in batches]).astype(np.float64)
    rel = np.sqrt(((y_t - y_e) ** 2).sum() / (y_e**2).sum())
    assert d.output_rel_diff == pytest.approx(rel, rel=1e-5)
    assert d.prediction_agreement == pytest.approx(np.mean(y_t.argmax(1) == y_e.argmax(1)))


def test_closed_form_rms_equals_the_array_computation(rng):
    x = rng.standard_normal((50, 4)) * 3 + 1
    mb, vb = x.mean(0), x.var(0)
    mr, vr = rng.standard_normal(4), rng.uniform(0.5, 4, 4)
    direct = np.sqrt(((((x - mb) / np.sqrt(vb + EPS)) - (x - mr) / np.sqrt(vr + EPS)) ** 2).mean(0))
    np.testing.assert_allclose(rms_normalized_difference(vb, mb, vr, mr, EPS), direct, rtol=1e-12)


@pytest.mark.parametrize("start_in_train_mode", [True, False])
def test_model_is_left_exactly_as_found(trained, start_in_train_mode):
    model = _fresh_copy(trained).train(start_in_train_mode)
    model[4].running_mean[0] = np.nan  # non-finite state must survive too
    before = {k: v.copy() for k, v in model.state_dict().items()}
    diagnose(model, [_data(1)() for _ in range(3)])
    after = model.state_dict()
    for k, v in before.items():
        np.testing.assert_array_equal(after[k], v, err_msg=k)
    assert all(m.training == start_in_train_mode for m in model.modules())
    assert "forward" not in model[1].__dict__


@pytest.mark.parametrize("via_bnlab_torch", [False, True])
def test_torch_model_gives_the_same_numbers_and_is_left_untouched(trained, via_bnlab_torch):
    torch = pytest.importorskip("torch")
    tm = torch.nn.Sequential(
        torch.nn.Linear(D, H), torch.nn.BatchNorm1d(H), torch.nn.ReLU(),
        torch.nn.Linear(H, H), torch.nn.BatchNorm1d(H), torch.nn.ReLU(), torch.nn.Linear(H, K),
    )  # fmt: skip
    tm.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in trained.state_dict().items()})
    if via_bnlab_torch:  # bnlab.torch's drop-in BatchNorm1d (an nn.BatchNorm1d subclass)
        import bnlab.torch

        tm = bnlab.torch.convert(tm)
        assert type(tm[1]).__module__.startswith("bnlab.torch")
    tm.eval()
    before = {k: v.clone() for k, v in tm.state_dict().items()}
    sample = _data(3)
    batches = [sample() for _ in range(4)]
    d_np, d_t = diagnose(trained, batches), diagnose(tm, batches)
    assert d_t.framework == "torch"
    for a, b in zip(d_np.layers, d_t.layers, strict=True):
        assert a.name == b.name
        np.testing.assert_allclose(b.mean_shift_sigma, a.mean_shift_sigma, rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(b.var_ratio, a.var_ratio, rtol=1e-3)
        assert b.train_eval_rms == pytest.approx(a.train_eval_rms, rel=1e-3)
        assert b.verdict == a.verdict
    assert d_t.output_rel_diff == pytest.approx(d_np.output_rel_diff, rel=1e-3)
    for k, v in tm.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not any(m.training for m in tm.modules())


def test_ghost_layers_are_diagnosed_as_batch_norm_layers():
    model = _train(_mlp(bn2=GhostBatchNorm1d(H, 16, backend="numpy")), steps=60)
    d = diagnose(model, [_data(1)() for _ in range(4)])
    assert d.layers[1].kind == "GhostBatchNorm1d(vbs=16)"
    assert d.layers[1].has_running_stats


# --------------------------------------------------------------------------- output


def test_table_json_and_plot(trained, tmp_path):
    model = _fresh_copy(trained)
    model[4].running_var[1] = np.inf
    d = diagnose(model, [_data(1)() for _ in range(3)])
    table = d.format_table()
    assert "verdict: BAD" in table and "[BAD] 4 (BatchNorm1d)" in table
    assert "momentum" in table and "0.1" in table
    d.save_json(tmp_path / "d.json")

    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    data = json.loads((tmp_path / "d.json").read_text(), parse_constant=no_constants)
    assert data["verdict"] == "bad" and data["layers"][1]["nonfinite_channels"] == [1]
    assert data["layers"][1]["var_ratio"][1] is None
    d.plot(tmp_path / "d.png")
    assert (tmp_path / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.json", "d.png"]  # no temp files


# --------------------------------------------------------------------------- bad input


@pytest.mark.reliability
def test_bad_input(trained):
    batch = _data(1)()
    with pytest.raises(TypeError, match="bnlab.nn.Module or a torch.nn.Module"):
        diagnose(object(), [batch])
    with pytest.raises(ValueError, match="no batch-norm layers"):
        diagnose(nn.Sequential(nn.Linear(D, K)), [batch])
    with pytest.raises(ValueError, match="batches is empty"):
        diagnose(trained, [])
    with pytest.raises(DTypeError, match=r"batches\[1\] must be a numeric array"):
        diagnose(trained, [batch, "not an array"])
    with pytest.raises(ValueError, match="max_batches must be a positive int"):
        diagnose(trained, [batch], max_batches=0)
    with pytest.raises(ValueError, match="var_ratio must be a finite number > 1"):
        Thresholds(var_ratio=0.5)
    with pytest.raises(ValueError, match="shift_sigma must be a finite number > 0"):
        Thresholds(shift_sigma=-1)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_numbers_match_a_direct_computation_for_images(rng, layout):
    """A lone BatchNorm2d: its input is the batch itself, reduced over (N, H, W)."""
    bn = nn.BatchNorm2d(3, dtype=np.float64, layout=None if layout == "NCHW" else "NHWC")
    bn.running_mean[...] = [0.2, -0.5, 1.0]
    bn.running_var[...] = [1.5, 0.7, 2.0]
    bn.num_batches_tracked[...] = 5
    model = nn.Sequential(bn).eval()
    batches = [
        rng.standard_normal((4, 3, 5, 5)) * [[[[1]], [[2]], [[0.5]]]] + 0.3 for _ in range(3)
    ]
    if layout == "NHWC":
        batches = [np.ascontiguousarray(b.transpose(0, 2, 3, 1)) for b in batches]
    d = diagnose(model, batches)
    axes = (0, 2, 3) if layout == "NCHW" else (0, 1, 2)
    allx = np.concatenate(batches)
    mu, var = allx.mean(axes), allx.var(axes)
    np.testing.assert_allclose(
        d.layers[0].mean_shift_sigma, (mu - bn.running_mean) / np.sqrt(var + EPS), rtol=1e-10
    )
    np.testing.assert_allclose(d.layers[0].var_ratio, var / bn.running_var, rtol=1e-10)
    shp = (1, -1, 1, 1) if layout == "NCHW" else (1, 1, 1, -1)
    te = []
    for b in batches:
        xb = (b - b.mean(axes, keepdims=True)) / np.sqrt(b.var(axes, keepdims=True) + EPS)
        xr = (b - bn.running_mean.reshape(shp)) / np.sqrt(bn.running_var.reshape(shp) + EPS)
        te.append(((xb - xr) ** 2).mean(axes))
    assert d.layers[0].train_eval_rms == pytest.approx(np.sqrt(np.mean(te)), rel=1e-10)
    assert d.layers[0].values_per_channel == 100
