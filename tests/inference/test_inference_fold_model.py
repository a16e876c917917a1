"""fold(model, calibration) on bnlab models: pairs, equivalence, certificate, refusal."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bnlab import nn
from bnlab.fold import find_pairs, fold
from bnlab.models import lenet_bn


def _trained_like(seed=0):
    """LeNet-BN in eval mode with non-trivial BN statistics and affine parameters."""
    rng = np.random.default_rng(seed)
    model = lenet_bn(seed=seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            c = m.num_features
            m.running_mean[...] = rng.standard_normal(c)
            m.running_var[...] = rng.uniform(0.3, 3.0, c)
            m.weight.data[...] = rng.uniform(0.5, 2.0, c)
            m.bias.data[...] = rng.standard_normal(c)
    return model.eval()


def test_fold_refuses_training_mode_and_changes_nothing():
    model = lenet_bn(seed=0)  # training mode by default
    before = model.state_dict()
    with pytest.raises(ValueError, match=r"eval mode.*model.eval\(\)"):
        fold(model)
    model.eval()
    model[5].train()
    with pytest.raises(ValueError, match="in training mode: 5"):
        fold(model)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_fold_pairs_equivalence_and_untouched_input(rng):
    model = _trained_like()
    before = model.state_dict()
    x = rng.standard_normal((5, 1, 28, 28)).astype(np.float32)
    folded, cert = fold(model, x)
    assert [p[0] for p in find_pairs(model)] == ["0", "4", "9", "12"]
    assert [r.name for r in cert.pairs] == ["0", "4", "9", "12"]
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in folded.modules())
    with nn.no_grad():
        np.testing.assert_allclose(folded(x), model(x), rtol=1e-4, atol=1e-5)
    for k, v in model.state_dict().items():  # the input model is not modified
        np.testing.assert_array_equal(v, before[k])
    for row in [*cert.pairs, cert.model]:
        assert 0 < row.folded_max_abs and row.folded_max_rel < 1e-5
        assert row.unfolded_max_rel < 1e-5
    assert "<whole model>" in str(cert) and cert.to_dict()["model"]["name"] == "<whole model>"


def test_certificate_detects_a_wrong_fold(rng, monkeypatch):
    """The certificate is not a constant: a sabotaged fold shows up as a large error."""
    import bnlab.fold.model as fm

    real = fm.fold_conv_bn

    def off_by_eps(*args):
        w, b = real(*args)
        return w * np.float32(1.01), b

    monkeypatch.setattr(fm, "fold_conv_bn", off_by_eps)
    _, cert = fold(_trained_like(), rng.standard_normal((2, 1, 28, 28)).astype(np.float32))
    assert all(r.folded_max_rel > 1e-3 for r in cert.pairs)
    assert cert.max_rel() > 1e-3


def test_without_calibration_pairs_are_listed_with_nan():
    _, cert = fold(_trained_like())
    assert len(cert.pairs) == 4 and cert.model is None
    assert all(math.isnan(r.folded_max_abs) for r in cert.pairs)


def test_fold_rejects_non_models():
    with pytest.raises(TypeError, match="bnlab.nn.Module"):
        fold({"0.weight": np.zeros((6, 1, 5, 5))})
