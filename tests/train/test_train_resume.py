"""Training loop: metrics.json schema, bit-identical resume, checkpoint validation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from train_helpers import single_thread, synthetic_splits

from bnlab.checkpoint import load_checkpoint, paths
from bnlab.errors import DataFormatError
from bnlab.models import lenet_bn
from bnlab.train import TrainConfig, read_metrics, train

CFG = dict(model="lenet-bn", batch_size=64, lr=1.0, seed=3, momentum=0.5)
TIMING = ("examples_per_s", "seconds")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One numba/BLAS thread: on a shared machine oversubscribed pools are ~10x slower."""
    with single_thread():
        yield


def _train(out, epochs, resume=False, splits=None, overwrite=False, **kw):
    cfg = TrainConfig(epochs=epochs, **{**CFG, **kw})
    return train(
        cfg,
        out,
        resume=resume,
        overwrite=overwrite,
        splits=splits or synthetic_splits(),
        progress=False,
        log=lambda s: None,
        report=False,
    )


def _without_timing(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    return out, _train(out, 2)


def test_metrics_json_schema_and_learning(straight):
    out, metrics = straight
    on_disk = read_metrics(out)
    assert on_disk["config"]["model"] == "lenet-bn" and on_disk["config"]["epochs"] == 2
    assert [r["epoch"] for r in on_disk["epochs"]] == [1, 2]
    keys = {"epoch", "train_loss", "train_acc", "test_acc", "examples_per_s", "seconds"}
    assert all(set(r) == keys for r in on_disk["epochs"])
    # the synthetic task is easy: the model must learn it (chance is 0.1)
    assert on_disk["epochs"][-1]["test_acc"] > 0.5
    assert on_disk["epochs"][1]["train_loss"] < on_disk["epochs"][0]["train_loss"]
    pop = on_disk["population_stats"]
    assert pop["method"] == "population" and pop["batches"] == 8 and pop["test_acc"] > 0.5


def test_resume_is_bit_identical(straight, tmp_path):
    out, metrics = straight
    _train(tmp_path, 1)
    resumed = _train(tmp_path, 2, resume=True)
    assert _without_timing(resumed["epochs"]) == _without_timing(metrics["epochs"])
    assert resumed["population_stats"] == metrics["population_stats"]
    a = load_checkpoint(out).model_state
    b = load_checkpoint(tmp_path).model_state
    assert list(a) == list(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    oa, ob = load_checkpoint(out).optim_state, load_checkpoint(tmp_path).optim_state
    assert list(oa) == list(ob) and len(oa) > 0  # momentum buffers were saved and restored
    for k in oa:
        np.testing.assert_array_equal(oa[k], ob[k], err_msg=k)


def test_resume_with_other_settings_is_refused(straight, tmp_path):
    out, _ = straight
    import shutil

    shutil.copytree(out, tmp_path / "run")
    with pytest.raises(ValueError, match="lr"):
        _train(tmp_path / "run", 3, resume=True, lr=0.5)
    with pytest.raises(ValueError, match="lenet"):
        _train(tmp_path / "run", 3, resume=True, model="lenet")


def test_fresh_run_refuses_to_overwrite_a_checkpoint(straight):
    out, _ = straight
    before = (out / "metrics.json").read_bytes()
    with pytest.raises(FileExistsError, match="--resume"):
        _train(out, 1)
    assert (out / "metrics.json").read_bytes() == before


def test_overwrite_starts_again_and_keeps_foreign_files(tmp_path):
    _train(tmp_path, 1)
    (tmp_path / "notes.txt").write_text("mine")
    first = (tmp_path / "checkpoint.safetensors").read_bytes()
    _train(tmp_path, 1, overwrite=True, lr=0.5)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert read_metrics(tmp_path)["config"]["lr"] == 0.5
    assert (tmp_path / "checkpoint.safetensors").read_bytes() != first
    with pytest.raises(ValueError, match="exclude"):
        _train(tmp_path, 1, overwrite=True, resume=True)


def test_checkpoint_of_another_model_is_refused(straight):
    out, _ = straight
    with pytest.raises(ValueError, match="lenet-bn"):
        load_checkpoint(out, expect_model="lenet")
    ckpt = load_checkpoint(out)
    from bnlab.models import lenet

    with pytest.raises(Exception, match="missing keys|shape"):
        lenet(0).load_state_dict(ckpt.model_state)


def test_truncated_checkpoint_is_refused_and_resume_writes_nothing(straight, tmp_path):
    out, _ = straight
    import shutil

    run = tmp_path / "run"
    shutil.copytree(out, run)
    weights, _ = paths(run)
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(DataFormatError):
        load_checkpoint(run)
    with pytest.raises(DataFormatError):
        _train(run, 3, resume=True)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_stale_sidecar_warns_and_the_weights_metadata_wins(straight, tmp_path):
    """A crash between the weights rename and the sidecar rename leaves this pair."""
    out, _ = straight
    import shutil

    from bnlab.checkpoint import StaleSidecarWarning

    run = tmp_path / "run"
    shutil.copytree(out, run)
    _, sidecar = paths(run)
    meta = json.loads(sidecar.read_text())
    meta["sha256"], meta["epoch"] = "0" * 64, 1
    sidecar.write_text(json.dumps(meta))
    with pytest.warns(StaleSidecarWarning, match="sha256"):
        ckpt = load_checkpoint(run)
    assert ckpt.epoch == 2


def test_bit_flip_in_tensor_data_is_refused(straight, tmp_path):
    out, _ = straight
    import shutil

    run = tmp_path / "run"
    shutil.copytree(out, run)
    weights, _ = paths(run)
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x40  # inside the last tensor's bytes: the file still parses
    weights.write_bytes(bytes(data))
    with pytest.raises(DataFormatError, match="checksum"):
        load_checkpoint(run)


def test_checkpoint_loads_into_fresh_model_with_same_outputs(straight):
    out, _ = straight
    ckpt = load_checkpoint(out)
    assert ckpt.epoch == 2 and ckpt.meta["rng"]["next_epoch"] == 2
    m = lenet_bn(0)
    m.load_state_dict(ckpt.model_state)
    assert int(m[1].num_batches_tracked) == 2 * 8  # 512 / 64 batches per epoch


def test_report_written_with_curves_and_bn_parameters(tmp_path):
    pytest.importorskip("matplotlib")
    cfg = TrainConfig(epochs=1, **CFG)
    train(cfg, tmp_path, splits=synthetic_splits(256, 100), progress=False, log=lambda s: None)
    text = (tmp_path / "report.md").read_text()
    assert "![loss](loss.png)" in text and "γ" in text and "β" in text
    assert "layer `1` (6 channels)" in text
    assert "population statistics" in text
    for png in ("loss.png", "accuracy.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("field", "value"),
    [("epochs", -1), ("batch_size", 0), ("model", "resnet"), ("lr", 0.0), ("seed", -2)],
)
def test_bad_config_values(field, value, tmp_path):
    cfg = TrainConfig(**{**CFG, field: value})
    with pytest.raises(ValueError, match=field):
        train(cfg, tmp_path / "x", splits=synthetic_splits(), progress=False)
    assert not (tmp_path / "x").exists()
