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
