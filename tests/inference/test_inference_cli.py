"""``bnlab fold`` and ``bnlab infer`` end to end (in-process), good and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from torch_resnet import randomized_resnet50

import bnlab.inference
from bnlab.cli import main
from bnlab.io import load_weights, save_safetensors

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory):
    model = randomized_resnet50(seed=1)
    path = tmp_path_factory.mktemp("w") / "resnet50.safetensors"
    save_safetensors(path, {k: v.numpy() for k, v in model.state_dict().items()})
    return path, model


@pytest.fixture
def lenet_file(tmp_path):
    from bnlab.models import lenet_bn

    model = lenet_bn(seed=3)
    for m in model.modules():  # non-trivial BN state so the fold changes the weights
        if hasattr(m, "running_var"):
            m.running_mean[...] = np.linspace(-1, 1, m.num_features)
            m.running_var[...] = np.linspace(0.5, 2, m.num_features)
    path = tmp_path / "lenet.safetensors"
    save_safetensors(path, model.state_dict())
    return path, model.eval()


def test_fold_cli_writes_folded_weights_and_certificate(lenet_file, tmp_path, capsys):
    from bnlab.fold import fold

    path, model = lenet_file
    out, cert = tmp_path / "folded.npz", tmp_path / "cert.json"
    assert (
        main(["fold", "--weights", str(path), "--out", str(out), "--certificate", str(cert)]) == 0
    )
    printed = capsys.readouterr().out
    assert "lenet-bn" in printed and "<whole model>" in printed
    expected, _ = fold(model)
    got = load_weights(out)
    assert list(got) == list(expected.state_dict())
    for k, v in expected.state_dict().items():
        np.testing.assert_array_equal(got[k], v)
    report = json.loads(cert.read_text())
    assert len(report["pairs"]) == 4 and report["model"]["folded_max_rel"] < 1e-5


def test_fold_cli_resnet50_then_infer_on_folded_and_unfolded(resnet_file, tmp_path, capsys):
    path, tmodel = resnet_file
    out = tmp_path / "folded.safetensors"
    assert main(["fold", "--weights", str(path), "--out", str(out), "--no-certificate"]) == 0
    x = np.random.default_rng(2).standard_normal((1, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        ref = tmodel(torch.from_numpy(x)).numpy()
    folded_logits = bnlab.inference.compile(out)(x)
    np.testing.assert_allclose(folded_logits, ref, atol=1e-3 * np.abs(ref).max())

    npy = tmp_path / "img.npy"
    np.save(npy, x[0])
    capsys.readouterr()
    for weights in (path, out):
        assert main(["infer", "--weights", str(weights), "--input", str(npy), "--topk", "3"]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert len(lines) == 3
        assert lines[0].split()[1:3] == ["class", str(int(np.argmax(ref)))]
        probs = [float(line.split()[-1]) for line in lines]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001


def test_infer_cli_png_and_labels(resnet_file, tmp_path, capsys):
    from PIL import Image

    path, _ = resnet_file
    rgb = np.random.default_rng(0).integers(0, 256, (240, 300, 3), dtype=np.uint8)
    png = tmp_path / "img.png"
    Image.fromarray(rgb).save(png)
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"name{i}" for i in range(1000)))
    assert (
        main(["infer", "--weights", str(path), "--input", str(png), "--labels", str(labels)]) == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 and all(line.split()[1].startswith("name") for line in lines)


def test_preprocess_is_the_imagenet_transform():
    from bnlab.inference.images import IMAGENET_MEAN, IMAGENET_STD, preprocess

    rgb = np.full((300, 400, 3), 128, np.uint8)
    out = preprocess(rgb)
    assert out.shape == (3, 224, 224) and out.dtype == np.float32
    np.testing.assert_allclose(out[:, 0, 0], (128 / 255 - IMAGENET_MEAN) / IMAGENET_STD, rtol=1e-5)


def _refused(argv, capsys, match):
    assert main(argv) == 2
    assert match in capsys.readouterr().err


def test_cli_bad_input(resnet_file, lenet_file, tmp_path, capsys):
    path, _ = resnet_file
    lenet, _ = lenet_file
    bad_img = tmp_path / "four.npy"
    np.save(bad_img, np.zeros((1, 4, 32, 32), np.float32))
    _refused(["infer", "--weights", str(path), "--input", str(bad_img)], capsys, "(N, 3, H, W)")
    _refused(["infer", "--weights", str(lenet), "--input", str(bad_img)], capsys, "error")
    garbage = tmp_path / "junk.safetensors"
    garbage.write_bytes(b"\xff" * 40)
    npy = tmp_path / "ok.npy"
    np.save(npy, np.zeros((3, 32, 32), np.float32))
    _refused(["infer", "--weights", str(garbage), "--input", str(npy)], capsys, "junk")
    _refused(["infer", "--weights", str(path), "--input", str(tmp_path / "no.png")], capsys, "no")
    _refused(["infer", "--weights", str(path), "--input", str(npy), "--topk", "0"], capsys, "topk")
    out = tmp_path / "out.npz"
    _refused(["fold", "--weights", str(garbage), "--out", str(out)], capsys, "junk")
    _refused(["fold", "--weights", str(lenet), "--out", str(tmp_path / "o.txt")], capsys, "--out")
    _refused(["fold", "--weights", str(lenet), "--out", str(lenet)], capsys, "--out")
    _refused(
        ["fold", "--weights", str(lenet), "--out", str(out), "--calibration", str(bad_img)],
        capsys,
        "error",
    )
    assert not out.exists()


# --------------------------------------------------------------------------- ONNX, runs, paths


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    """A small BN CNN exported to ONNX with its BatchNormalization nodes kept."""
    pytest.importorskip("onnx")
    import warnings

    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, stride=2, groups=8), nn.BatchNorm2d(16),
                          nn.Hardswish(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(16, 10)).eval()  # fmt: skip
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("onnx") / "net.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, 16, 16),), str(path), dynamo=False,
                          input_names=["x"], output_names=["y"], opset_version=17,
                          training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
                          dynamic_axes={"x": {0: "N"}})  # fmt: skip
    return path, model


def test_fold_and_infer_an_onnx_file(onnx_file, tmp_path, capsys):
    import onnx

    path, model = onnx_file
    out, cert = tmp_path / "folded.onnx", tmp_path / "cert.json"
    assert main(["fold", str(path), "--out", str(out), "--certificate", str(cert)]) == 0
    printed = capsys.readouterr().out
    assert "2 BN folded" in printed and "<whole model>" in printed
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(str(out)).graph.node}
    report = json.loads(cert.read_text())
    assert len(report["pairs"]) == 2 and report["model"]["folded_max_rel"] < 1e-5
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    for f in (path, out):
        np.testing.assert_allclose(bnlab.inference.compile(f)(x), ref, rtol=0,
                                   atol=1e-5 * np.abs(ref).max())  # fmt: skip
    np.save(tmp_path / "x.npy", x)
    assert main(["infer", str(out), "--input", str(tmp_path / "x.npy"), "--topk", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "image 0:" and f"class {int(np.argmax(ref[0]))}" in lines[1]


def test_fold_and_infer_a_training_run(tmp_path, capsys):
    """A run folder of `bnlab train` (a checkpoint with the `model.` key prefix)."""
    from bnlab.checkpoint import save_checkpoint
    from bnlab.models import lenet_bn
    from bnlab.optim import SGD

    model = lenet_bn(seed=2)
    for m in model.modules():
        if hasattr(m, "running_var"):
            m.running_mean[...] = np.linspace(-0.5, 0.5, m.num_features)
            m.running_var[...] = np.linspace(0.5, 2, m.num_features)
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoint", model, SGD(model.parameters(), lr=0.1),
                    model_name="lenet-bn", epoch=1)  # fmt: skip
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    np.save(tmp_path / "imgs.npy", images)
    for source in (run, run / "checkpoint.safetensors"):
        assert main(["infer", str(source), "--input", str(tmp_path / "imgs.npy")]) == 0
        assert capsys.readouterr().out.count("image ") == 3
    out = tmp_path / "lenet_folded.safetensors"
    assert main(["fold", str(run), "--out", str(out)]) == 0
    assert "lenet-bn" in capsys.readouterr().out
    from bnlab import nn

    x = images[:, None].astype(np.float32) / 255
    with nn.no_grad():
        ref = model.eval()(x)
    np.testing.assert_allclose(bnlab.inference.compile(out)(x), ref, rtol=0,
                               atol=1e-5 * np.abs(ref).max())  # fmt: skip


def test_fold_and_infer_refuse_bad_paths_and_values(onnx_file, tmp_path, capsys):
    path, _ = onnx_file
    nan = np.zeros((1, 3, 16, 16), np.float32)
    nan[0, 1, 2, 3] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    np.save(tmp_path / "gray.npy", np.zeros((1, 1, 16, 16), np.float32))
    before = sorted(p.name for p in tmp_path.iterdir())
    cases = [
        (["infer", str(path), "--input", str(tmp_path / "nan.npy")], "NaN"),
        (["infer", str(path), "--input", str(tmp_path / "gray.npy")], "3-channel"),
        (["infer", str(tmp_path / "none.onnx"), "--input", str(tmp_path / "nan.npy")], "NaN"),
        (["infer", "--input", str(tmp_path / "gray.npy")], "needs a model"),
        (["fold", str(path), "--out", str(tmp_path / "o.onnx"), "--calibration",
          str(tmp_path / "nan.npy")], "NaN"),
        (["fold", str(path), "--out", str(tmp_path / "o.onnx"), "--calibration",
          str(tmp_path / "gray.npy")], "channels"),
        (["fold", str(path), "--out", str(tmp_path / "no" / "o.onnx")], "does not exist"),
        (["fold", str(path), "--out", str(tmp_path)], "is a folder"),
        (["fold", str(path), "--out", str(tmp_path / "o.safetensors")], "must end in .onnx"),
        (["fold", str(tmp_path / "none.onnx"), "--out", str(tmp_path / "o.onnx")], "none.onnx"),
        (["fold", str(tmp_path), "--out", str(tmp_path / "o.npz")], "checkpoint"),
        (["fold", str(path), "--out", str(tmp_path / "o.onnx"), "--certificate",
          str(tmp_path / "no" / "c.json")], "does not exist"),
    ]  # fmt: skip
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        # one error line (after argparse's usage lines for errors found while parsing)
        last = err.strip().splitlines()[-1]
        assert needle in last and "Traceback" not in err and last.startswith("bnlab "), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
