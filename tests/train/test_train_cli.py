"""``bnlab train`` / ``bnlab evaluate`` end to end on a small fake Fashion-MNIST folder, bad CLI
values, the progress bar, and (real data) a short run that must beat chance clearly."""

from __future__ import annotations

import io
import json

import pytest
from train_helpers import single_thread, write_fake_fashion_mnist

from bnlab.cli import main
from bnlab.progress import Progress


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One numba/BLAS thread: on a shared machine oversubscribed pools are ~10x slower."""
    with single_thread():
        yield


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory):
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("fmnist"))


def test_train_then_evaluate_cli(fake_data, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "train",
        "--model",
        "lenet-bn",
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--lr",
        "1.0",
        "--seed",
        "0",
        "--out",
        str(out),
        "--data",
        str(fake_data),
        "--no-progress",
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "epoch  1/1" in text and "test_acc" in text and "examples/s" in text
    assert f"report: {out}/report.md" in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert main(["evaluate", "--checkpoint", str(out), "--data", str(fake_data)]) == 0
    line = capsys.readouterr().out
    assert f"test accuracy {metrics['epochs'][-1]['test_acc']:.4f}" in line
    # resume to 2 epochs through the CLI
    assert main([*argv[:4], "2", *argv[5:], "--resume"]) == 0
    assert len(json.loads((out / "metrics.json").read_text())["epochs"]) == 2


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--epochs", "-1"], "--epochs"),
        (["--batch-size", "0"], "--batch-size"),
        (["--model", "resnet"], "--model"),
        (["--lr", "nan"], "--lr"),
        (["--lr", "abc"], "--lr"),
    ],
)
def test_bad_cli_values_exit_2_and_write_nothing(args, words, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *args]) == 2
    assert words in capsys.readouterr().err
    assert not out.exists()


def test_missing_data_is_a_clear_error(tmp_path, capsys, monkeypatch):
    import bnlab.data.fashion_mnist as fm

    monkeypatch.setattr(fm, "SYSTEM_DIRS", [tmp_path / "nowhere"])
    monkeypatch.delenv("BNLAB_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    rc = main(
        [
            "train",
            "--out",
            str(tmp_path / "run"),
            "--data",
            str(tmp_path / "empty"),
            "--no-progress",
        ]
    )
    assert rc == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


def test_evaluate_truncated_checkpoint(fake_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--epochs",
                "1",
                "--out",
                str(out),
                "--data",
                str(fake_data),
                "--no-progress",
                "--batch-size",
                "128",
            ]
        )
        == 0
    )
    w = out / "checkpoint.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(w), "--data", str(fake_data)]) == 2
    assert "checkpoint.safetensors" in capsys.readouterr().err


def test_progress_bar_renders_and_stays_off_stdout(capsys):
    buf = io.StringIO()
    with Progress(4, "epoch 1/2", stream=buf, enabled=True) as bar:
        for _ in range(4):
            bar.update(1, loss=0.5)
    text = buf.getvalue()
    assert "epoch 1/2 [" in text and "4/4" in text and "loss=0.5" in text
    assert capsys.readouterr().out == ""
    silent = io.StringIO()
    with Progress(3, stream=silent) as bar:  # not a terminal, not forced: silent
        bar.update(3)
    assert silent.getvalue() == ""
    with pytest.raises(ValueError, match="total"):
        Progress(-1)


@pytest.mark.slow
def test_short_real_data_run_beats_chance(fashion_mnist_dir, tmp_path):
    """200 steps of batch 64 (the first 12,800 training images); test on 5,000 test images."""
    from bnlab.train import TrainConfig, train

    cfg = TrainConfig(
        epochs=1, batch_size=64, lr=1.0, seed=0, train_limit=200 * 64, test_limit=5000
    )
    metrics = train(
        cfg, tmp_path, data_root=fashion_mnist_dir, progress=False, log=print, report=False
    )
    assert metrics["epochs"][0]["test_acc"] >= 0.70
