"""ResNet-50: the compiled engine and bnlab.models.resnet50 vs a plain-PyTorch ResNet-50.

Random weights with randomized BN statistics (tests/inference/torch_resnet.py); logits must agree
within 1e-3 relative (to the largest |logit|), folded and unfolded, batch 1 and 4.
"""

from __future__ import annotations

import numpy as np
import pytest
from torch_resnet import randomized_resnet50

import bnlab.inference
from bnlab.errors import DataFormatError, DTypeError, ShapeError

torch = pytest.importorskip("torch")
RTOL = 1e-3


@pytest.fixture(scope="module")
def torch_model():
    return randomized_resnet50(seed=0)


@pytest.fixture(scope="module")
def state_dict(torch_model):
    return {k: v.numpy().copy() for k, v in torch_model.state_dict().items()}


@pytest.fixture(scope="module")
def images():
    x = np.random.default_rng(7).standard_normal((4, 3, 224, 224)).astype(np.float32)
    x[1] *= 2.0  # images of different contrast: logits that differ between samples
    x[3] = np.abs(x[3])
    return x


@pytest.fixture(scope="module")
def torch_logits(torch_model, images):
    with torch.no_grad():
        return torch_model(torch.from_numpy(images)).numpy()


@pytest.fixture(scope="module")
def engines(state_dict):
    return {fold: bnlab.inference.compile(state_dict, fold_bn=fold) for fold in (True, False)}


def assert_logits_close(out, ref):
    scale = np.abs(ref).max()
    np.testing.assert_allclose(out, ref, rtol=0, atol=RTOL * scale)


def test_reference_logits_differ_between_images(torch_logits):
    """Guard: the comparison below is meaningful (far above the tolerance)."""
    scale = np.abs(torch_logits).max()
    assert np.abs(torch_logits[0] - torch_logits[1]).max() > 50 * RTOL * scale
    assert np.abs(torch_logits[0] - torch_logits[3]).max() > 50 * RTOL * scale


@pytest.mark.parametrize("fold_bn", [True, False])
@pytest.mark.parametrize("batch", [1, 4])
def test_engine_matches_torch(engines, images, torch_logits, fold_bn, batch):
    out = engines[fold_bn](images[:batch])
    assert out.shape == (batch, 1000) and out.dtype == np.float32
    assert_logits_close(out, torch_logits[:batch])


def test_engine_equals_the_reference_evaluation_of_its_graph(state_dict, images, engines):
    """The engine against bnlab.inference.reference (float64 NumPy) on the same folded graph."""
    from bnlab.inference import reference

    packed = bnlab.inference.compile(state_dict, threads=2)
    ref = reference.run(packed.graph, images[:2])
    np.testing.assert_allclose(packed(images[:2]), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_two_engines_predicting_concurrently(engines, images, torch_logits):
    """Engines share one worker pool per thread count: concurrent calls must not mix jobs."""
    import threading

    out = {}

    def run(fold):
        out[fold] = engines[fold](images[:1])

    threads = [threading.Thread(target=run, args=(f,)) for f in (True, False)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for fold in (True, False):
        assert_logits_close(out[fold], torch_logits[:1])


def test_batch_lanes_equal_shared_layers(state_dict, images, torch_logits):
    """threads=2, batch 4: two lanes of 2 images, each running the whole network on one thread;
    batch 3 (odd): one lane, every layer's items shared. Both equal one-thread logits."""
    one = bnlab.inference.compile(state_dict, threads=1)
    two = bnlab.inference.compile(state_dict, threads=2)
    assert two._lanes(4) == 2 and two._lanes(3) == 1 and one._lanes(4) == 1
    for batch in (4, 3):
        ref = one(images[:batch])
        np.testing.assert_allclose(two(images[:batch]), ref, rtol=0, atol=1e-6 * np.abs(ref).max())
        assert_logits_close(ref, torch_logits[:batch])
    assert {k[0] for k in two._plans} == {0, 1, 2}  # the lanes' own plans (and buffers)


def test_engine_nhwc_input_buffer_reuse_and_fresh_outputs(engines, images, torch_logits):
    predict = engines[True]
    first = predict(images[:1])
    nhwc = np.ascontiguousarray(images[2:3].transpose(0, 2, 3, 1))
    second = predict(nhwc, layout="NHWC")
    assert_logits_close(second, torch_logits[2:3])
    assert_logits_close(first, torch_logits[:1])  # not overwritten by the second call
    assert_logits_close(predict(images[:1].astype(np.float64)), torch_logits[:1])


def test_engine_from_torch_model_and_from_files(torch_model, state_dict, tmp_path):
    from bnlab.io import save_npz, save_safetensors

    x = np.random.default_rng(5).standard_normal((1, 3, 64, 80)).astype(np.float32)
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(x)).numpy()
    save_safetensors(tmp_path / "w.safetensors", state_dict)
    save_npz(tmp_path / "w.npz", state_dict)
    for source in (torch_model, tmp_path / "w.safetensors", str(tmp_path / "w.npz")):
        assert_logits_close(bnlab.inference.compile(source)(x), ref)


def test_bnlab_resnet50_matches_torch_folded_and_unfolded(torch_model, state_dict):
    """The slow NCHW bnlab.nn model (small images keep this cheap), then fold() on it."""
    from bnlab import nn
    from bnlab.fold import fold
    from bnlab.models.resnet import resnet50

    x = np.random.default_rng(3).standard_normal((4, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(x)).numpy()
    model = resnet50(state_dict)
    assert list(model.state_dict()) == list(state_dict)
    assert not model.training
    folded, cert = fold(model, x[:1])
    with nn.no_grad():
        for b in (1, 4):
            assert_logits_close(model(x[:b]), ref[:b])
            assert_logits_close(folded(x[:b]), ref[:b])
    assert not any(k.startswith("bn1") or ".bn" in k for k in folded.state_dict())
    assert len(cert.pairs) == 53  # 1 stem + 16 blocks x 3 + 4 downsample
    # folding costs at most a few float32 roundings more than not folding
    for row in [*cert.pairs, cert.model]:
        assert row.folded_max_rel < 1e-5, row
        assert row.folded_max_rel < 20 * row.unfolded_max_rel + 1e-6, row
    # the folded bnlab model compiles and gives the same logits
    assert_logits_close(bnlab.inference.compile(folded)(x[:2]), ref[:2])
    again = resnet50(folded.state_dict())
    with nn.no_grad():
        assert_logits_close(again(x[:1]), ref[:1])


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("x", "err", "match"),
    [
        (np.zeros((1, 4, 32, 32), np.float32), ShapeError, "3 color channels"),
        (np.zeros((3, 32, 32), np.float32), ShapeError, "batch of images"),
        (np.zeros((1, 3, 32, 32), np.uint8), DTypeError, "float32 images"),
        ([[1.0]], TypeError, "NumPy array"),
    ],
)
def test_engine_rejects_bad_images(engines, x, err, match):
    with pytest.raises(err, match=match):
        engines[True](x)


def test_engine_rejects_bad_layouts(engines, state_dict):
    with pytest.raises(ShapeError, match="3 color channels"):
        engines[True](np.zeros((1, 3, 32, 32), np.float32), layout="NHWC")
    with pytest.raises(ValueError, match="layout must be"):
        engines[True](np.zeros((1, 3, 32, 32), np.float32), layout="CHW")
    with pytest.raises(ValueError, match="only engine layout"):
        bnlab.inference.compile(state_dict, layout="NCHW")
    with pytest.raises(ValueError, match="threads must be"):
        bnlab.inference.compile(state_dict, threads=0)


def test_wrong_weights_list_every_problem(state_dict):
    from bnlab.models.resnet import resnet50

    bad = dict(state_dict)
    del bad["layer2.1.bn2.running_var"]
    bad["layer9.weight"] = np.zeros(3, np.float32)
    bad["layer3.0.conv2.weight"] = np.zeros((256, 256, 1, 1), np.float32)
    for load in (bnlab.inference.compile, resnet50):
        with pytest.raises(DataFormatError) as info:
            load(bad)
        msg = str(info.value)
        assert "missing keys: layer2.1.bn2.running_var" in msg
        assert "unexpected keys: layer9.weight" in msg
        assert "layer3.0.conv2.weight: expected (256, 256, 3, 3), got (256, 256, 1, 1)" in msg
    shapes_only = dict(state_dict, **{"fc.bias": np.zeros(999, np.float32)})
    with pytest.raises(ShapeError, match=r"fc.bias: expected \(1000,\), got \(999,\)"):
        bnlab.inference.compile(shapes_only)


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_corrupt_weight_files_are_refused(tmp_path, suffix):
    from bnlab.models.resnet import resnet50

    path = tmp_path / f"broken{suffix}"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json or zip")
    for load in (bnlab.inference.compile, resnet50):
        with pytest.raises(DataFormatError):
            load(path)
