"""Run folders off the happy path: one owner, destructive flags last, unwritable folders found
first, finished runs left alone, diverging runs stopped with valid files, data provenance."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from reliability_helpers import remount_read_only, snapshot

from bnlab.cli import EXIT_FAILED, EXIT_USAGE, main
from bnlab.errors import TrainingDiverged, UsageError
from bnlab.runs import RunFolder, RunFolderBusy
from bnlab.train import TrainConfig, read_metrics, short_last_batch, train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from train_helpers import single_thread, synthetic_splits, write_fake_fashion_mnist  # noqa: E402

FAMILY = "run folders: one owner, --overwrite last, full/read-only disks, divergence"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory):
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("fmnist"), n_train=256, n_test=64)


def _argv(out, data, *extra, epochs=1):
    return [
        "train", "--out", str(out), "--data", str(data), "--epochs", str(epochs),
        "--batch-size", "64", "--no-progress", *extra,
    ]  # fmt: skip


def _strict_json(path):
    """json.loads that refuses NaN/Infinity (they are not JSON)."""

    def refuse(name):
        raise ValueError(f"{path} holds {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


# --------------------------------------------------------------------------- one owner


def test_a_second_claim_fails_at_once_and_the_first_keeps_the_folder(tmp_path):
    with RunFolder.claim(tmp_path / "run") as first:
        with pytest.raises(RunFolderBusy, match="in use by another bnlab process"):
            with RunFolder.claim(tmp_path / "run"):
                pass
        assert first.path.is_dir()
    with RunFolder.claim(tmp_path / "run"):  # released: claimable again
        pass


def test_a_second_bnlab_train_on_the_same_out_is_refused(tmp_path, fake_data, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from bnlab.runs import RunFolder
            with RunFolder.claim({str(out)!r}):
                print("claimed", flush=True)
                time.sleep(60)
        """)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "claimed"
        assert main(_argv(out, fake_data)) == EXIT_USAGE
        err = capsys.readouterr().err
        assert "in use by another bnlab process" in err and "Traceback" not in err
        assert not (out / "checkpoint.safetensors").exists()
        holder.send_signal(signal.SIGKILL)  # a killed owner leaves nothing to clean
        holder.wait(10)
        assert main(_argv(out, fake_data)) == 0
    finally:
        holder.kill()
        holder.wait(10)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


# --------------------------------------------------------------------------- --overwrite acts last


def test_overwrite_with_unreadable_data_keeps_the_old_run(tmp_path, fake_data, capsys):
    out = tmp_path / "run"
    assert main(_argv(out, fake_data)) == 0
    before = snapshot(out)
    broken = tmp_path / "broken"
    write_fake_fashion_mnist(broken, n_train=64, n_test=16)
    (broken / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b not really gzip")
    assert main(_argv(out, broken, "--overwrite")) == EXIT_USAGE
    assert "train-images" in capsys.readouterr().err
    assert snapshot(out) == before


def test_overwrite_that_diverges_in_its_first_epoch_keeps_the_old_run(tmp_path, fake_data):
    out = tmp_path / "run"
    assert main(_argv(out, fake_data)) == 0
    before = snapshot(out)
    assert main(_argv(out, fake_data, "--overwrite", "--lr", "3e38")) == EXIT_FAILED
    assert snapshot(out) == before


def test_overwrite_replaces_the_old_report_once_the_new_run_saves(tmp_path, fake_data):
    out = tmp_path / "run"
    assert main(_argv(out, fake_data, "--lr", "0.5")) == 0
    (out / "notes.txt").write_text("mine")
    old_ckpt = (out / "checkpoint.safetensors").read_bytes()
    assert main(_argv(out, fake_data, "--overwrite", "--lr", "0.25")) == 0
    assert (out / "checkpoint.safetensors").read_bytes() != old_ckpt
    assert read_metrics(out)["config"]["lr"] == 0.25
    assert "--lr 0.25" in (out / "report.md").read_text()
    assert (out / "notes.txt").read_text() == "mine"


# --------------------------------------------------------------------------- writability first


def test_resume_into_a_read_only_folder_fails_before_training(small_fs, fake_data, capsys):
    point = small_fs("4m")
    out = point / "run"
    assert main(_argv(out, fake_data)) == 0
    remount_read_only(point)
    before = snapshot(out)
    capsys.readouterr()
    assert main(_argv(out, fake_data, "--resume", epochs=3)) == EXIT_USAGE
    captured = capsys.readouterr()
    assert "Read-only file system" in captured.err and str(out) in captured.err
    assert "epoch" not in captured.out  # not one epoch was trained
    assert snapshot(out) == before


def test_a_full_disk_is_a_clear_error_and_the_previous_checkpoint_survives(
    small_fs, fake_data, capsys
):
    point = small_fs("280k")  # room for one LeNet-BN checkpoint (~180 KB), not for two
    out = point / "run"
    code = main(_argv(out, fake_data, epochs=3))
    err = capsys.readouterr().err
    assert code == EXIT_USAGE, err
    assert "No space left on device" in err and "Traceback" not in err
    ckpt = read_metrics(out)
    assert len(ckpt["epochs"]) >= 1
    from bnlab.checkpoint import load_checkpoint

    assert load_checkpoint(out).epoch == len(ckpt["epochs"])


@pytest.mark.parametrize("where", ["under a file", "missing parent on read-only fs"])
def test_unusable_out_paths(tmp_path, small_fs, fake_data, capsys, where):
    if where == "under a file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "run"
    else:
        point = small_fs("64k", read_only=True)
        out = point / "a" / "run"
    assert main(_argv(out, fake_data)) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("bnlab train: error:") and "Traceback" not in err


# --------------------------------------------------------------------------- resume rules


def test_resuming_a_finished_run_with_fewer_epochs_changes_nothing(tmp_path, fake_data, capsys):
    out = tmp_path / "run"
    assert main(_argv(out, fake_data, epochs=2)) == 0
    before = snapshot(out)
    capsys.readouterr()
    for epochs in (1, 2):
        assert main(_argv(out, fake_data, "--resume", epochs=epochs)) == 0
        assert "nothing to do" in capsys.readouterr().out
        assert snapshot(out) == before


def test_a_run_of_one_engine_is_not_resumed_by_the_other(tmp_path):
    from bnlab.runs import resume_error

    numpy_cfg = {"model": "lenet-bn", "epochs": 2, "engine": "numpy"}
    torch_cfg = {**numpy_cfg, "engine": "torch", "world_size": 1}
    assert "--engine torch" in resume_error(tmp_path, numpy_cfg, torch_cfg)
    assert "--engine numpy" in resume_error(tmp_path, torch_cfg, {**numpy_cfg})
    older = {k: v for k, v in numpy_cfg.items() if k != "engine"}  # runs before the field
    assert resume_error(tmp_path, numpy_cfg, older) is None


def test_numpy_engine_refuses_to_resume_a_torch_run(tmp_path, fake_data, capsys):
    out = tmp_path / "run"
    assert main(_argv(out, fake_data)) == 0
    meta_path = out / "checkpoint.json"
    _forge_engine(out, "torch")
    before = snapshot(out)
    assert main(_argv(out, fake_data, "--resume", epochs=2)) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--engine torch" in err
    assert snapshot(out) == before
    assert meta_path.exists()


def _forge_engine(out, engine):
    """Rewrite a checkpoint's stored config as if another engine had written it (valid sums)."""
    from bnlab.checkpoint import load_checkpoint, save_state

    ckpt = load_checkpoint(out)
    meta = dict(ckpt.meta)
    meta["config"] = {**meta["config"], "engine": engine, "world_size": 1}
    extra = {k: meta[k] for k in ("config", "rng", "epochs", "data") if k in meta}
    save_state(
        out, ckpt.model_state, ckpt.optim_state, meta["optimizer"],
        model_name=meta["model"], epoch=meta["epoch"], extra=extra,
    )  # fmt: skip


# --------------------------------------------------------------------------- divergence


def test_a_diverging_run_stops_with_valid_consistent_files(tmp_path):
    out = tmp_path / "run"
    cfg = dict(model="lenet-bn", batch_size=64, seed=0)
    train(TrainConfig(epochs=1, lr=0.1, **cfg), out, splits=synthetic_splits(256, 64),
          progress=False, log=lambda s: None)  # fmt: skip
    # the same folder cannot resume with another lr: start again, and diverge in epoch 1
    with pytest.raises(TrainingDiverged, match=r"epoch 1 at step \d+.*--lr"):
        train(TrainConfig(epochs=3, lr=3e38, **cfg), tmp_path / "div",
              splits=synthetic_splits(256, 64), progress=False, log=lambda s: None)  # fmt: skip
    assert not (tmp_path / "div").exists()  # nothing to keep: the new folder is removed
    for name in ("metrics.json", "checkpoint.json"):
        _strict_json(out / name)


def test_divergence_after_a_finished_epoch_keeps_it_and_resume_repeats_the_message(
    tmp_path, monkeypatch
):
    import bnlab.train as T

    out = tmp_path / "run"
    cfg = TrainConfig(model="lenet-bn", epochs=3, batch_size=64, lr=0.1, seed=0)
    real_step = T.train_step
    calls = {"n": 0}

    def step_that_explodes_in_epoch_2(model, loss_fn, opt, x, y):
        calls["n"] += 1
        if calls["n"] > 4:  # 256 examples / 64 = 4 steps per epoch
            next(iter(model.parameters())).data[...] = float("inf")
        return real_step(model, loss_fn, opt, x, y)

    monkeypatch.setattr(T, "train_step", step_that_explodes_in_epoch_2)
    kw = dict(splits=synthetic_splits(256, 64), progress=False, log=lambda s: None)
    with pytest.raises(TrainingDiverged, match="epoch 2.*epoch 1's checkpoint is the last"):
        train(cfg, out, **kw)
    metrics = _strict_json(out / "metrics.json")
    assert [r["epoch"] for r in metrics["epochs"]] == [1]
    from bnlab.checkpoint import load_checkpoint

    assert load_checkpoint(out).epoch == 1
    before = snapshot(out)
    with pytest.raises(TrainingDiverged, match="epoch 2"):
        train(cfg, out, resume=True, **kw)
    assert snapshot(out) == before


def test_diverging_cli_run_exits_1_with_one_line(tmp_path, fake_data, capsys):
    out = tmp_path / "run"
    assert main(_argv(out, fake_data, "--lr", "3e38", epochs=2)) == EXIT_FAILED
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "diverged" in err[0] and "--lr" in err[0]


# --------------------------------------------------------------------------- data provenance


def test_metrics_and_report_record_the_data_used(tmp_path, fake_data):
    out = tmp_path / "run"
    assert main(_argv(out, fake_data)) == 0
    data = read_metrics(out)["data"]
    assert data["folder"] == str(fake_data.resolve())
    assert len(data["files"]) == 4 and data["train_examples"] == 256
    assert all(len(f["sha256"]) == 64 and f["bytes"] > 0 for f in data["files"].values())
    report = (out / "report.md").read_text()
    assert str(fake_data.resolve()) in report and "sha256" in report


def test_named_data_folder_without_data_is_an_error_even_with_a_system_copy(
    tmp_path, fake_data, monkeypatch, capsys
):
    import bnlab.data.fashion_mnist as fm

    monkeypatch.setattr(fm, "SYSTEM_DIRS", [fake_data])  # a usable copy elsewhere
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "run"
    assert main(_argv(out, empty)) == EXIT_USAGE
    assert str(empty) in capsys.readouterr().err
    assert not out.exists()
    monkeypatch.setenv("BNLAB_DATA", str(empty))
    assert main([a for a in _argv(out, empty) if a not in ("--data", str(empty))]) == EXIT_USAGE
    assert "$BNLAB_DATA" in capsys.readouterr().err


# --------------------------------------------------------------------------- a batch of one


@pytest.mark.parametrize(
    "n, batch, world, dropped",
    [(257, 64, 1, 1), (256, 64, 1, 0), (258, 64, 1, 0), (65, 64, 2, 1), (66, 64, 2, 0),
     (67, 64, 4, 3), (1, 64, 1, 0), (64, 64, 1, 0)],
)  # fmt: skip
def test_short_last_batch(n, batch, world, dropped):
    assert short_last_batch(n, batch, world) == dropped


def test_a_last_batch_of_one_is_dropped_and_said(tmp_path, fake_data, capsys):
    out = tmp_path / "run"
    assert main(_argv(out, fake_data, "--train-limit", "129")) == 0
    assert "dropped every epoch" in capsys.readouterr().out
    assert read_metrics(out)["data"]["dropped_last_batch"] == 1


def test_claim_refuses_both_flags_and_a_file_path(tmp_path):
    with pytest.raises(UsageError, match="exclude"):
        with RunFolder.claim(tmp_path, resume=True, overwrite=True):
            pass
    (tmp_path / "f").write_text("")
    with pytest.raises(UsageError, match="not a folder"):
        with RunFolder.claim(tmp_path / "f"):
            pass


def test_resume_on_other_data_is_refused_and_a_moved_copy_is_fine(tmp_path, fake_data, capsys):
    import shutil

    out = tmp_path / "run"
    assert main(_argv(out, fake_data)) == 0
    other = write_fake_fashion_mnist(tmp_path / "other", n_train=300, n_test=64)
    before = snapshot(out)
    assert main(_argv(out, other, "--resume", epochs=2)) == EXIT_USAGE
    assert "other data files" in capsys.readouterr().err
    assert snapshot(out) == before
    moved = tmp_path / "moved"
    shutil.copytree(fake_data, moved)
    assert main(_argv(out, moved, "--resume", epochs=2)) == 0
    assert read_metrics(out)["data"]["folder"] == str(moved.resolve())
