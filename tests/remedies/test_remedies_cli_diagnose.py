"""``bnlab diagnose --checkpoint PATH``: a LeNet-BN checkpoint whose running statistics match its
inputs passes (exit 0), shifted inputs and NaN running statistics fail (exit 1), bad arguments and
files exit 2 naming the problem. Inputs are a synthetic .npz (no real data needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bnlab.checkpoint import save_checkpoint
from bnlab.cli import main
from bnlab.data.batches import to_float_images
from bnlab.io import save_npz
from bnlab.models import lenet_bn
from bnlab.nn import BatchNorm1d, BatchNorm2d
from bnlab.nn.module import no_grad
from bnlab.optim import SGD


def _images(n: int, seed: int) -> np.ndarray:
    """uint8 (n, 28, 28): blurry blobs, a stand-in for Fashion-MNIST."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:28, :28]
    cy, cx = rng.uniform(8, 20, (2, n, 1, 1))
    img = 200 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 40) + rng.uniform(0, 40, (n, 28, 28))
    return img.clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A checkpoint whose running statistics are the exact average over the data's batches."""
    tmp = tmp_path_factory.mktemp("diag")
    model = lenet_bn(seed=0)
    images = _images(192, seed=1)
    for m in model.modules():
        if isinstance(m, (BatchNorm1d, BatchNorm2d)):
            m.momentum = None  # cumulative average: running stats = mean over the batches
    model.train()
    with no_grad():
        for i in range(6):
            model(to_float_images(images[i * 32 : (i + 1) * 32]))
    for m in model.modules():
        if isinstance(m, (BatchNorm1d, BatchNorm2d)):
            m.momentum = 0.1
    save_checkpoint(tmp / "checkpoint", model, SGD(model.parameters(), lr=0.1),
                    model_name="lenet-bn", epoch=1)  # fmt: skip
    save_npz(tmp / "x.npz", {"x": images})
    return tmp


def _diagnose(run_dir, *extra):
    args = ["diagnose", "--checkpoint", str(run_dir), "--inputs", str(run_dir / "x.npz")]
    return main([*args, "--batch-size", "32", "--batches", "3", *extra])


def test_matching_statistics_pass_and_outputs_are_written(run_dir, tmp_path, capsys):
    out_json, out_png = tmp_path / "d.json", tmp_path / "d.png"
    assert _diagnose(run_dir, "--json", str(out_json), "--plot", str(out_png)) == 0
    text = capsys.readouterr().out
    assert "model lenet-bn" in text and "BatchNorm2d" in text and "BatchNorm1d" in text
    data = json.loads(out_json.read_text())
    assert data["verdict"] == "ok", text
    assert [lay["name"] for lay in data["layers"]] == ["1", "5", "10", "13"]
    assert all(lay["max_abs_shift_sigma"] < 0.5 for lay in data["layers"])
    assert out_png.read_bytes()[:4] == b"\x89PNG"


def test_shifted_inputs_fail_with_exit_1(run_dir, capsys):
    assert _diagnose(run_dir, "--shift", "0.5") == 1
    out = capsys.readouterr().out
    assert "inputs transformed: x * 1 + 0.5" in out and "data shift" in out


def test_nan_running_statistics_load_and_fail(run_dir, tmp_path, capsys):
    from bnlab.checkpoint import load_checkpoint

    ckpt = load_checkpoint(run_dir)
    model = lenet_bn(seed=0)
    model.load_state_dict(ckpt.model_state)
    model[5].running_var[3] = np.nan
    save_checkpoint(tmp_path / "checkpoint", model, SGD(model.parameters(), lr=0.1),
                    model_name="lenet-bn", epoch=1)  # fmt: skip
    args = ["diagnose", "--checkpoint", str(tmp_path), "--inputs", str(run_dir / "x.npz")]
    assert main([*args, "--batch-size", "32", "--batches", "2"]) == 1
    out = capsys.readouterr().out
    assert "NaN/Inf in 1 channel(s) [3]" in out and "unsafe" in out


@pytest.mark.reliability
@pytest.mark.parametrize(
    "extra,match",
    [
        (["--batch-size", "0"], "argument --batch-size: must be an integer >= 2, got 0"),
        (["--batch-size", "1"], "argument --batch-size: must be an integer >= 2, got 1"),
        (["--batches", "-1"], "argument --batches: must be an integer >= 1, got -1"),
        (["--batch-size", "1000"], "fewer than --batch-size"),
    ],
)
def test_bad_arguments_exit_2(run_dir, capsys, extra, match):
    args = ["diagnose", "--checkpoint", str(run_dir), "--inputs", str(run_dir / "x.npz")]
    assert main([*args, *extra]) == 2
    assert match in capsys.readouterr().err


@pytest.mark.reliability
def test_bad_files_exit_2(run_dir, tmp_path, capsys):
    args = ["diagnose", "--checkpoint", str(tmp_path / "nope"), "--inputs", str(run_dir / "x.npz")]
    assert main(args) == 2
    assert "nope: no such run folder" in capsys.readouterr().err
    assert main(["diagnose", "--checkpoint", str(run_dir), "--inputs", "x.npz"]) == 2
    assert "--inputs: x.npz: no such file" in capsys.readouterr().err
    save_npz(tmp_path / "y.npz", {"y": np.zeros(3)})
    args = ["diagnose", "--checkpoint", str(run_dir), "--inputs", str(tmp_path / "y.npz")]
    assert main(args) == 2
    assert "has no array 'x'" in capsys.readouterr().err
