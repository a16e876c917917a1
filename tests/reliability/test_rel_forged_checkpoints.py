"""Checkpoints whose checksums are right but whose values are not: integer tensors, a negative
running variance, NaN weights, a negative batch count. Loading must refuse them with a message
naming the tensor, before any model is touched (they used to evaluate to chance accuracy)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from reliability_helpers import expect_clean_error

from bnlab.checkpoint import load_checkpoint, save_state
from bnlab.cli import EXIT_USAGE, main
from bnlab.errors import ShapeError
from bnlab.models import lenet_bn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from train_helpers import single_thread, write_fake_fashion_mnist  # noqa: E402

FAMILY = "bad input: forged checkpoints (valid checksums, bad values)"

FORGERIES = {
    "int32 weights": ("0.weight", lambda v: v.astype(np.int32)),
    "int64 running_var": ("1.running_var", lambda v: np.ones(v.shape, np.int64)),
    "negative running_var": ("1.running_var", lambda v: -np.abs(v) - 1),
    "one negative variance": ("5.running_var", lambda v: np.r_[v[:-1], -1e-3].astype(v.dtype)),
    "NaN weight": (
        "10.weight",
        lambda v: np.where(np.arange(v.size).reshape(v.shape) == 3, np.nan, v).astype(v.dtype),
    ),  # fmt: skip
    "Inf running_mean": ("13.running_mean", lambda v: np.full_like(v, np.inf)),
    "bool bias": ("0.bias", lambda v: v > 0),
    "float batch counter": ("1.num_batches_tracked", lambda v: np.float32(3.0) + 0 * v),
    "negative batch counter": ("1.num_batches_tracked", lambda v: np.array(-5, np.int64)),
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("forged")
    data = write_fake_fashion_mnist(root / "data", n_train=256, n_test=64)
    with single_thread():
        argv = ["train", "--epochs", "1", "--batch-size", "64", "--data", str(data)]
        assert main([*argv, "--out", str(root / "run"), "--no-progress"]) == 0
    return root, data


def _forge(run, name: str) -> Path:
    root, _ = run
    key, change = FORGERIES[name]
    ckpt = load_checkpoint(root / "run")
    state = dict(ckpt.model_state)
    assert key in state
    state[key] = np.asarray(change(state[key]))
    out = root / name.replace(" ", "-")
    out.mkdir(exist_ok=True)
    save_state(
        out / "checkpoint", state, ckpt.optim_state, ckpt.meta["optimizer"],
        model_name=ckpt.model_name, epoch=ckpt.epoch,
        extra={k: ckpt.meta[k] for k in ("config", "epochs") if k in ckpt.meta},
    )  # fmt: skip
    return out


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_loading_refuses_the_forged_value(run, name):
    path = _forge(run, name)
    ckpt = load_checkpoint(path)  # the file itself is intact: checksums match
    model = lenet_bn(0)
    key = FORGERIES[name][0]
    expect_clean_error(lambda: model.load_state_dict(ckpt.model_state), ShapeError, [key], [model])


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_evaluate_and_recalibrate_exit_2_naming_the_tensor(run, name, capsys):
    path = _forge(run, name)
    _, data = run
    key = FORGERIES[name][0]
    for argv in (
        ["evaluate", "--checkpoint", str(path), "--data", str(data)],
        [
            "recalibrate",
            "--checkpoint",
            str(path),
            "--out",
            str(path.parent / f"{path.name}-r"),
            "--data",
            str(data),
        ],  # fmt: skip
    ):
        assert main(argv) == EXIT_USAGE
        err = capsys.readouterr().err
        assert key in err and "Traceback" not in err, err
    assert not (path.parent / f"{path.name}-r").exists()


@pytest.mark.parametrize("name", ["negative running_var", "NaN weight", "Inf running_mean"])
def test_diagnose_looks_at_broken_values_but_not_at_wrong_dtypes(run, name, capsys):
    """A diagnosis must be able to show a broken state: values are not checked there."""
    path = _forge(run, name)
    _, data = run
    code = main(["diagnose", "--checkpoint", str(path), "--data", str(data), "--batches", "2",
                 "--batch-size", "16"])  # fmt: skip
    assert code in (0, 1), capsys.readouterr().err
    assert "verdict:" in capsys.readouterr().out
    path = _forge(run, "int32 weights")
    assert main(["diagnose", "--checkpoint", str(path), "--data", str(data)]) == EXIT_USAGE
    assert "0.weight" in capsys.readouterr().err


def test_the_workflow_train_diagnose_recalibrate_evaluate(run, capsys):
    """The loop diagnose recommends, three commands on a run folder."""
    root, data = run
    d = ["--data", str(data)]
    code = main(["diagnose", "--checkpoint", str(root / "run"), *d, "--batch-size", "32"])
    out = capsys.readouterr().out
    assert code in (0, 1) and "verdict:" in out
    assert main(["recalibrate", "--checkpoint", str(root / "run"), "--out",
                 str(root / "recal"), *d]) == 0  # fmt: skip
    line = capsys.readouterr().out
    assert "recalibrated 4 BN layers" in line and "test accuracy" in line
    assert main(["evaluate", "--checkpoint", str(root / "recal"), *d]) == 0
    after = float(capsys.readouterr().out.split()[2])
    assert f"-> {after:.4f}" in line  # the accuracy recalibrate printed is evaluate's
    assert main(["diagnose", "--checkpoint", str(root / "recal"), *d, "--batch-size", "32"]) in (
        0,
        1,
    )
    before = load_checkpoint(root / "run").model_state
    recal = load_checkpoint(root / "recal")
    assert recal.meta["recalibration"]["method"] == "population"
    for key, value in before.items():
        if "running" in key:
            assert not np.array_equal(value, recal.model_state[key]), key
        elif "num_batches" not in key:
            np.testing.assert_array_equal(value, recal.model_state[key])
