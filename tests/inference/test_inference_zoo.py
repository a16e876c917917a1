"""torchvision's BN CNNs on the compiled engine vs PyTorch: from the module (torch.export) and
from an ONNX file, 64x64 images (224x224 for VGG's ONNX file: its exporter needs the 7x7 map).

Tolerance: max |engine − PyTorch| <= 1e-4 · max |PyTorch| on the logits (float32 both), the
issue's bar. The networks' random weights are chosen well-conditioned (tests/inference/zoo.py):
there PyTorch's own float32 logits are within 1e-5 of its float64 ones, so the bar measures the
engine, not rounding amplified through 100 random layers.
"""

from __future__ import annotations

import numpy as np
import pytest
from zoo import ZOO, build, export_onnx, torchvision_models

import bnlab.inference

torch = pytest.importorskip("torch")
if torchvision_models() is None:  # pragma: no cover - torchvision is a dev dependency
    pytest.skip("torchvision is not installed", allow_module_level=True)

RTOL = 1e-4
SIZE = 64


@pytest.fixture(scope="module")
def models():
    return {}


def model_of(models, name):
    if name not in models:
        models[name] = build(name)
    return models[name]


def images(size, n=2, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)
    x[-1] = np.abs(x[-1])  # two different kinds of input: the logits must differ
    return x


def torch_logits(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def assert_close(out, ref):
    scale = np.abs(ref).max()
    assert np.abs(ref[0] - ref[-1]).max() > 100 * RTOL * scale  # the check can fail
    np.testing.assert_allclose(out, ref, rtol=0, atol=RTOL * scale)


@pytest.mark.parametrize("name", ZOO)
def test_network_from_torch_matches_pytorch(models, name):
    model = model_of(models, name)
    x = images(SIZE)
    predict = bnlab.inference.compile(model, input_shape=(3, SIZE, SIZE), threads=2)
    out = predict(x)
    assert out.shape == (2, 1000) and out.dtype == np.float32
    assert_close(out, torch_logits(model, x))
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert len(predict.folded_pairs) == n_bn  # every BN folded into its conv
    assert not any(nd.op in ("bn", "affine") for nd in predict.graph.nodes)
    labels = set(predict._plans[(1, 1, SIZE, SIZE)].labels)  # lane 1 of 2 images on 2 threads
    if name in ("efficientnet_b0", "mobilenet_v3_large"):  # squeeze-excitation in the weights
        assert "se_gemm 1x1" in labels
    if name.startswith("resnext"):
        assert "strip_conv 3x3" in labels  # the grouped kernel, no block-diagonal GEMM


@pytest.mark.parametrize("name", ZOO)
def test_network_from_onnx_matches_pytorch(models, name, tmp_path):
    """The ONNX file keeps BatchNormalization nodes (training=PRESERVE): the engine folds them."""
    pytest.importorskip("onnx")
    model = model_of(models, name)
    size = 224 if name == "vgg11_bn" else SIZE
    path = tmp_path / f"{name}.onnx"
    export_onnx(model, path, size)
    x = images(size, n=2 if size == SIZE else 1)
    if size != SIZE:  # one image: compare against a second, different one for the guard
        x = np.concatenate([x, images(size, 1, seed=1)])
    predict = bnlab.inference.compile(path, threads=2)
    assert_close(predict(x), torch_logits(model, x))
    assert len(predict.folded_pairs) == sum(
        isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()
    )


def test_fold_certificate_of_an_onnx_network(models, tmp_path):
    """MobileNetV3 (ReLU, Hardswish, squeeze-excitation): every folded pair costs at most a few
    float32 roundings more than the unfolded pair (certificate, both against float64)."""
    pytest.importorskip("onnx")
    path = tmp_path / "m.onnx"
    export_onnx(model_of(models, "mobilenet_v3_large"), path, SIZE)
    graph, folded, cert = bnlab.inference.fold_graph(path, images(SIZE, n=1))
    assert len(cert.pairs) == sum(nd.op == "bn" for nd in graph.nodes) > 40
    assert not any(nd.op == "bn" for nd in folded.nodes)
    for row in [*cert.pairs, cert.model]:
        assert row.folded_max_rel < 1e-5, row
        assert row.folded_max_rel < 20 * row.unfolded_max_rel + 1e-6, row
