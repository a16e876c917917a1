"""Bad inputs to folding (bnlab.fold) and the inference engine (bnlab.inference).

Folding functions are pure: a refused call, and an accepted one, leave their inputs unchanged.
"""

from __future__ import annotations

import numpy as np
import pytest
from reliability_helpers import expect_clean_error

from bnlab.errors import DataFormatError, DTypeError, ShapeError
from bnlab.fold import fold_bn_conv, fold_bn_linear, fold_conv_bn

FAMILY = "bad input: fold & inference"


@pytest.fixture
def bn(rng):
    c = 4
    return {
        "running_mean": rng.standard_normal(c).astype(np.float32),
        "running_var": rng.random(c).astype(np.float32) + 0.1,
        "gamma": rng.standard_normal(c).astype(np.float32),
        "beta": rng.standard_normal(c).astype(np.float32),
    }


@pytest.fixture
def conv_w(rng):
    return rng.standard_normal((4, 2, 3, 3)).astype(np.float32)


def test_fold_is_pure(bn, conv_w):
    state = [conv_w, *bn.values()]
    before = [a.copy() for a in state]
    fold_conv_bn(conv_w, None, bn["running_mean"], bn["running_var"], 1e-5, bn["gamma"], bn["beta"])
    for a, b in zip(state, before, strict=True):
        np.testing.assert_array_equal(a, b)


def _conv_bn(bn, w, **override):
    kw = {**bn, "eps": 1e-5, **override}
    return lambda: fold_conv_bn(
        w, None, kw["running_mean"], kw["running_var"], kw["eps"], kw["gamma"], kw["beta"]
    )


FOLD_CASES = [
    ("mean-size", {"running_mean": np.zeros(5, np.float32)}, ShapeError, ["running_mean", "(4,)"]),
    ("var-size", {"running_var": np.ones(3, np.float32)}, ShapeError, ["running_var", "(4,)"]),
    ("var-negative", {"running_var": -np.ones(4, np.float32)}, ValueError, ["running_var", ">= 0"]),
    ("gamma-size", {"gamma": np.ones(2, np.float32)}, ShapeError, ["gamma", "(4,)"]),
    ("eps-zero", {"eps": 0.0}, ValueError, ["eps", "> 0"]),
    ("eps-negative", {"eps": -1e-3}, ValueError, ["eps"]),
    ("mean-int", {"running_mean": np.zeros(4, np.int32)}, DTypeError, ["running_mean", "floating"]),
    ("mean-list", {"running_mean": [0.0] * 4}, TypeError, ["running_mean", "NumPy array"]),
]


@pytest.mark.parametrize("case", FOLD_CASES, ids=[c[0] for c in FOLD_CASES])
def test_fold_conv_bn_bad_bn_vectors(bn, conv_w, case):
    _, override, exc, needles = case
    expect_clean_error(_conv_bn(bn, conv_w, **override), exc, needles, [conv_w, *bn.values()])


def test_fold_bad_weights(bn, rng):
    w1 = rng.standard_normal(4).astype(np.float32)
    expect_clean_error(_conv_bn(bn, w1), ShapeError, ["weight"], [w1])
    wi = np.ones((4, 2, 3, 3), np.int8)
    expect_clean_error(_conv_bn(bn, wi), DTypeError, ["weight", "floating"], [wi])


def test_fold_bn_into_padded_conv_is_refused(bn, rng):
    w = rng.standard_normal((3, 4, 3, 3)).astype(np.float32)
    b = bn
    expect_clean_error(
        lambda: fold_bn_conv(
            b["running_mean"], b["running_var"], 1e-5, b["gamma"], b["beta"], w, padding=1
        ),  # fmt: skip
        ValueError,
        ["padding", "approximate=True"],
        [w, *bn.values()],
    )


def test_fold_bn_conv_groups_and_channels(bn, rng):
    b = bn
    w = rng.standard_normal((6, 2, 1, 1)).astype(np.float32)
    expect_clean_error(
        lambda: fold_bn_conv(
            b["running_mean"], b["running_var"], 1e-5, b["gamma"], b["beta"], w, groups=4
        ),  # fmt: skip
        ShapeError,
        ["groups=4"],
    )
    w3 = rng.standard_normal((6, 3, 1, 1)).astype(np.float32)  # C_in = 3, BN has 4 channels
    expect_clean_error(
        lambda: fold_bn_conv(b["running_mean"], b["running_var"], 1e-5, b["gamma"], b["beta"], w3),
        ShapeError,
        ["running_mean", "C_in=3"],
    )


def test_fold_bn_linear_needs_a_2d_weight(bn, rng):
    b = bn
    w = rng.standard_normal((3, 4, 1, 1)).astype(np.float32)
    expect_clean_error(
        lambda: fold_bn_linear(b["running_mean"], b["running_var"], 1e-5, b["gamma"], b["beta"], w),
        ShapeError,
        ["linear weight", "(C_out, C_in)"],
    )


def test_fold_model_pass_refuses_training_mode():
    import bnlab.fold as fold_mod
    from bnlab.models import lenet_bn

    model = lenet_bn(seed=0).train()
    expect_clean_error(lambda: fold_mod.fold(model), ValueError, ["eval"], [model])


# ------------------------------------------------------------------ inference engine

inference = pytest.importorskip("bnlab.inference")


@pytest.fixture(scope="module")
def tiny_resnet_sd():
    """A valid random state dict of the smallest bottleneck ResNet the spec allows."""
    from bnlab.inference.spec import expected_shapes, resnet_spec

    rng = np.random.default_rng(0)
    sd = {}
    for k, shape in expected_shapes(resnet_spec((1, 1, 1, 1), num_classes=10)).items():
        sd[k] = (rng.random(shape) + 0.5 if k.endswith("running_var") else
                 rng.standard_normal(shape) * 0.05).astype(np.float32)  # fmt: skip
    return sd


@pytest.fixture(scope="module")
def predict(tiny_resnet_sd):
    return inference.compile(tiny_resnet_sd)


def test_compile_does_not_modify_its_input(tiny_resnet_sd):
    before = {k: v.copy() for k, v in tiny_resnet_sd.items()}
    predict = inference.compile(tiny_resnet_sd)
    assert predict(np.zeros((1, 3, 32, 32), np.float32)).shape == (1, 10)
    for k, v in before.items():
        np.testing.assert_array_equal(tiny_resnet_sd[k], v)


def test_compile_bad_state_dicts(tiny_resnet_sd):
    sd = dict(tiny_resnet_sd)
    missing = {k: v for k, v in sd.items() if k != "layer2.0.bn2.running_var"}
    expect_clean_error(
        lambda: inference.compile(missing), DataFormatError, ["missing keys", "layer2.0.bn2"]
    )
    wrong = {**sd, "layer1.0.conv2.weight": np.zeros((64, 64, 1, 1), np.float32)}
    expect_clean_error(
        lambda: inference.compile(wrong), ShapeError, ["layer1.0.conv2.weight", "(64, 64, 3, 3)"]
    )
    ints = {**sd, "fc.bias": np.zeros(10, np.int64)}
    expect_clean_error(lambda: inference.compile(ints), DataFormatError, ["fc.bias", "dtype"])
    expect_clean_error(lambda: inference.compile([1, 2]), TypeError, ["state_dict", "mapping"])


def test_compile_bad_options(tiny_resnet_sd):
    expect_clean_error(
        lambda: inference.compile(tiny_resnet_sd, layout="NCHW"), ValueError, ["layout", "NHWC"]
    )
    expect_clean_error(
        lambda: inference.compile(tiny_resnet_sd, fold_bn="yes"), TypeError, ["fold_bn"]
    )


def test_compile_from_a_corrupt_file(tmp_path, tiny_resnet_sd):
    from bnlab.io import save_safetensors

    path = tmp_path / "r.safetensors"
    save_safetensors(path, tiny_resnet_sd)
    path.write_bytes(path.read_bytes()[:-10])
    expect_clean_error(lambda: inference.compile(path), DataFormatError, ["r.safetensors"])


@pytest.mark.parametrize(
    "x, kwargs, exc, needles",
    [
        (np.zeros((1, 3, 32, 32), np.uint8), {}, DTypeError, ["x", "float32"]),
        (np.zeros((1, 1, 32, 32), np.float32), {}, ShapeError, ["3 color channels"]),
        (np.zeros((3, 32, 32), np.float32), {}, ShapeError, ["(N, 3, H, W)"]),
        (np.zeros((0, 3, 32, 32), np.float32), {}, ShapeError, ["empty"]),
        (np.zeros((1, 3, 32, 32), np.float32), {"layout": "CHWN"}, ValueError, ["layout"]),
        ([[0.0]], {}, TypeError, ["x", "NumPy array"]),
    ],
    ids=["uint8", "one-channel", "3d", "empty", "layout", "list"],
)
def test_predict_bad_images(predict, x, kwargs, exc, needles):
    state = [x] if isinstance(x, np.ndarray) else []
    expect_clean_error(lambda: predict(x, **kwargs), exc, needles, state)
