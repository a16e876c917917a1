"""Bad inputs to bnlab.nn modules and models: clear error, parameters and buffers untouched."""

from __future__ import annotations

import numpy as np
import pytest
from reliability_helpers import expect_clean_error

from bnlab import nn
from bnlab.errors import DTypeError, ShapeError
from bnlab.models import build_model, lenet, lenet_bn

FAMILY = "bad input: nn modules"


def _trained_bn(rng, cls=nn.BatchNorm2d, shape=(4, 3, 2, 2)):
    """A BN module whose buffers are not at their initial values (so a reset would show)."""
    m = cls(shape[1])
    m(rng.standard_normal(shape).astype(np.float32))
    return m


def x4(rng, *shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def test_bn_wrong_ndim(rng):
    m = _trained_bn(rng)
    expect_clean_error(lambda: m(x4(rng, 4, 3, 2)), ShapeError, ["4-D", "(N, C, H, W)"], [m])


def test_bn_channel_mismatch_names_the_input(rng):
    m = _trained_bn(rng)
    expect_clean_error(lambda: m(x4(rng, 4, 4, 2, 2)), ShapeError, ["input", "3 channels"], [m])


def test_bn_channel_mismatch_is_a_shape_error_and_touches_nothing(rng):
    m = _trained_bn(rng)
    expect_clean_error(lambda: m(x4(rng, 4, 4, 2, 2)), ShapeError, ["channels"], [m])


def test_bn_one_value_per_channel_in_training(rng):
    m = _trained_bn(rng, nn.BatchNorm1d, (5, 3))
    expect_clean_error(lambda: m(x4(rng, 1, 3)), ShapeError, ["more than 1 value per channel"], [m])


def test_bn_one_value_per_channel_is_fine_in_eval(rng):
    m = _trained_bn(rng, nn.BatchNorm1d, (5, 3)).eval()
    assert m(x4(rng, 1, 3)).shape == (1, 3)


def test_bn_empty_batch_in_training_is_refused(rng):
    """Stricter than PyTorch (which returns an empty output): documented in docs/reliability.md."""
    m = _trained_bn(rng)
    expect_clean_error(lambda: m(x4(rng, 0, 3, 2, 2)), ShapeError, ["empty"], [m])


def test_bn_integer_input(rng):
    m = _trained_bn(rng)
    x = np.ones((4, 3, 2, 2), np.int64)
    expect_clean_error(lambda: m(x), DTypeError, ["input", "floating"], [m, x])


@pytest.mark.parametrize(
    "kwargs, needles",
    [
        ({"num_features": 0}, ["num_features", "positive"]),
        ({"num_features": 2.5}, ["num_features"]),
        ({"eps": 0.0}, ["eps"]),
        ({"eps": -1.0}, ["eps"]),
        ({"momentum": -0.5}, ["momentum", "[0, 1]"]),
        ({"momentum": 3}, ["momentum", "[0, 1]"]),
        ({"dtype": np.int32}, ["dtype", "floating"]),
    ],
    ids=["features-0", "features-float", "eps-0", "eps-neg", "momentum-neg", "momentum-3", "int"],
)
def test_bn_constructor_hyperparameters(kwargs, needles):
    args = {"num_features": 3, **kwargs}
    with pytest.raises((ValueError, TypeError)) as err:
        nn.BatchNorm2d(**args)
    for n in needles:
        assert n.lower() in str(err.value).lower(), err.value


def test_conv_channel_mismatch_and_too_small(rng):
    conv = nn.Conv2d(3, 4, 3)
    expect_clean_error(lambda: conv(x4(rng, 2, 2, 5, 5)), ShapeError, ["3 channels"], [conv])
    expect_clean_error(lambda: conv(x4(rng, 2, 3, 2, 2)), ShapeError, ["too small"], [conv])
    with pytest.raises(ValueError, match="groups=2 must divide in_channels=3"):
        nn.Conv2d(3, 4, 3, groups=2)
    with pytest.raises(ValueError, match="stride"):
        nn.Conv2d(3, 4, 3, stride=0)


def test_linear_feature_mismatch(rng):
    lin = nn.Linear(5, 2)
    expect_clean_error(lambda: lin(x4(rng, 3, 4)), ShapeError, ["5 features"], [lin])


def test_group_and_layer_norm_shapes(rng):
    gn = nn.GroupNorm(2, 4)
    expect_clean_error(lambda: gn(x4(rng, 2, 6, 3, 3)), ShapeError, ["4 channels"], [gn])
    with pytest.raises(ValueError, match="num_groups=3 must divide num_channels=4"):
        nn.GroupNorm(3, 4)
    ln = nn.LayerNorm(5)
    expect_clean_error(lambda: ln(x4(rng, 2, 4)), ShapeError, ["normalized_shape"], [ln])


def test_cross_entropy_bad_labels(rng):
    loss = nn.CrossEntropyLoss()
    z = x4(rng, 4, 10)
    expect_clean_error(
        lambda: loss(z, np.array([0, 1, 10, 2])), ValueError, ["labels", "[0, 10)"], [z]
    )
    expect_clean_error(lambda: loss(z, np.zeros(4, np.float32)), DTypeError, ["labels", "integer"])
    expect_clean_error(lambda: loss(z, np.zeros(3, np.int64)), ShapeError, ["labels", "(4,)"])
    with pytest.raises(ValueError, match="reduction"):
        nn.CrossEntropyLoss(reduction="none!")


def test_backward_without_forward():
    m = nn.BatchNorm2d(3)
    expect_clean_error(
        lambda: m.backward(np.ones((2, 3, 2, 2), np.float32)), RuntimeError, ["without", "forward"]
    )


def test_load_state_dict_of_another_model_changes_nothing():
    target = lenet_bn(seed=1)
    expect_clean_error(
        lambda: target.load_state_dict(lenet(seed=2).state_dict()),
        KeyError,
        ["missing keys", "running_mean", "unexpected keys"],
        [target],
    )


def test_load_state_dict_shape_mismatch_changes_nothing():
    target = lenet_bn(seed=1)
    sd = lenet_bn(seed=2).state_dict()
    sd = {k: v.copy() for k, v in sd.items()}
    key = next(k for k in sd if k.endswith("running_var"))
    sd[key] = np.ones(sd[key].shape[0] + 1, np.float32)
    expect_clean_error(lambda: target.load_state_dict(sd), ShapeError, [key, "shape"], [target])


def test_load_state_dict_nonfinite_changes_nothing():
    target = lenet_bn(seed=1)
    sd = {k: v.copy() for k, v in lenet_bn(seed=2).state_dict().items()}
    key = next(k for k in sd if k.endswith("weight"))
    sd[key].flat[0] = np.nan
    expect_clean_error(lambda: target.load_state_dict(sd), ValueError, [key, "NaN"], [target])


def test_train_mode_flag_and_dtype(rng):
    m = lenet_bn(seed=0)
    expect_clean_error(lambda: m.train("eval"), TypeError, ["mode", "True or False"], [m])
    expect_clean_error(lambda: m.to(np.int32), DTypeError, ["dtype", "floating"], [m])


def test_unknown_model_name():
    with pytest.raises(ValueError, match="model must be one of"):
        build_model("resnet9000")
