"""``bnlab train --engine torch``: a 2-process DDP + SyncBN run through the CLI on the real data,
the flags passed through to ``bnlab.torch.train``, and the argument errors."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from bnlab.cli import build_parser, main

HANG_TIMEOUT_S = 80  # a hung rendezvous or collective fails the test, never the suite
EPOCH_KEYS = {"epoch", "train_loss", "train_acc", "test_acc", "examples_per_s", "seconds"}


def _run_cli(argv: list[str]) -> subprocess.CompletedProcess:
    """``python -m bnlab.cli ...`` in its own session, killed with its torchrun workers if hung."""
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bnlab.cli", *argv],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=HANG_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"bnlab train --engine torch did not finish within {HANG_TIMEOUT_S} s")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out)


@pytest.mark.slow
def test_two_process_torch_run_writes_a_sane_run_folder(fashion_mnist_dir, tmp_path):
    pytest.importorskip("torch")
    from bnlab.checkpoint import load_checkpoint
    from bnlab.models import lenet_bn

    out = tmp_path / "run"
    argv = ["train", "--engine", "torch", "--nproc", "2", "--epochs", "1", "--batch-size", "128"]
    # 1025 = 8 batches of 128 + a last batch of 1, which SyncBN cannot normalize: dropped
    argv += ["--train-limit", "1025", "--test-limit", "500", "--lr", "0.5", "--threads", "1"]
    argv += ["--data", str(fashion_mnist_dir), "--out", str(out), "--no-progress"]
    done = _run_cli(argv)
    assert done.returncode == 0, done.stdout
    assert "dropped every epoch" in done.stdout and "Traceback" not in done.stdout

    metrics = json.loads((out / "metrics.json").read_text())
    cfg = metrics["config"]
    assert (cfg["engine"], cfg["world_size"], cfg["batch_size"]) == ("torch", 2, 128)
    assert (cfg["train_limit"], cfg["test_limit"], cfg["lr"]) == (1025, 500, 0.5)
    assert metrics["data"]["dropped_last_batch"] == 1
    assert metrics["data"]["folder"] == str(fashion_mnist_dir.resolve())
    (row,) = metrics["epochs"]
    assert set(row) == EPOCH_KEYS and row["epoch"] == 1
    assert math.isfinite(row["train_loss"]) and 0 < row["train_loss"] < 10
    assert 0.1 < row["train_acc"] <= 1  # 8 steps of LeNet-BN learn something on the real data
    assert 0 <= row["test_acc"] <= 1 and row["examples_per_s"] > 0
    assert "final test accuracy" in done.stdout

    ckpt = load_checkpoint(out, expect_model="lenet-bn")
    assert ckpt.epoch == 1
    assert set(ckpt.model_state) == set(lenet_bn().state_dict())  # loadable by the NumPy engine
    for key, value in ckpt.model_state.items():
        assert np.isfinite(value).all(), key
    running_var = [v for k, v in ckpt.model_state.items() if k.endswith("running_var")]
    assert running_var and all((v > 0).all() and not np.allclose(v, 1) for v in running_var)
    report = (out / "report.md").read_text()
    assert "--engine torch --nproc 2" in report and (out / "loss.png").is_file()

    # a diverging --overwrite run: exit 1, bnlab's one line and no torchrun report, old run kept
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    lr_at = argv.index("--lr") + 1
    diverging = [*argv[:lr_at], "3e38", *argv[lr_at + 1 :], "--overwrite"]
    done = _run_cli(diverging)
    assert done.returncode == 1, done.stdout
    assert "Traceback" not in done.stdout and "ChildFailedError" not in done.stdout
    assert "bnlab train: error: training diverged" in done.stdout
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def _parse(argv):
    return build_parser().parse_args(["train", "--out", "run", *argv])


def test_every_flag_passes_through_to_the_torch_trainer():
    pytest.importorskip("torch")
    from bnlab.cli.train import torch_argv
    from bnlab.torch.train import parse_args

    argv = ["--engine", "torch", "--epochs", "3", "--batch-size", "64", "--lr", "0.1"]
    argv += ["--momentum", "0.9", "--weight-decay", "1e-4", "--seed", "7", "--data", "d"]
    argv += ["--train-limit", "100", "--test-limit", "50", "--backend", "numpy", "--threads", "2"]
    for mode in ([], ["--resume"], ["--overwrite"]):
        cli = _parse([*argv, *mode])
        got = vars(parse_args(torch_argv(cli)))
        assert got == {k: getattr(cli, k) for k in got}, mode


def test_nproc_must_be_positive(capsys):
    assert main(["train", "--engine", "torch", "--nproc", "0", "--out", "unused"]) == 2
    assert "--nproc: must be an integer >= 1, got 0" in capsys.readouterr().err


def test_several_processes_need_the_torch_engine(tmp_path, capsys):
    assert main(["train", "--nproc", "2", "--out", str(tmp_path / "run")]) == 2
    assert "--nproc 2 needs --engine torch" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_torch_engine_trains_only_lenet_bn(tmp_path, capsys):
    argv = ["train", "--engine", "torch", "--model", "lenet", "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    assert "--engine torch trains lenet-bn, got --model lenet" in capsys.readouterr().err


def test_torch_engine_without_torch_says_how_to_install_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    assert main(["train", "--engine", "torch", "--out", str(tmp_path / "run")]) == 2
    assert "pip install bnlab[torch]" in capsys.readouterr().err


def test_run_folder_errors_come_before_any_process_starts(tmp_path, capsys):
    pytest.importorskip("torch")
    (tmp_path / "checkpoint.safetensors").write_bytes(b"")  # a previous run's weights
    argv = ["train", "--engine", "torch", "--nproc", "2", "--out", str(tmp_path)]
    assert main(argv) == 2
    assert "already holds a checkpoint; pass --resume" in capsys.readouterr().err
    assert main([*argv[:-1], str(tmp_path / "new"), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_one_process_torch_run_trains_in_the_cli_process(tmp_path, capsys):
    pytest.importorskip("torch")
    from train_helpers import single_thread, write_fake_fashion_mnist

    data = write_fake_fashion_mnist(tmp_path / "data", n_train=96, n_test=48)
    out = tmp_path / "run"
    argv = ["train", "--engine", "torch", "--epochs", "2", "--batch-size", "32", "--lr", "0.5"]
    argv += ["--data", str(data), "--out", str(out)]
    with single_thread():  # --threads sets this process's numba threads: restored after
        assert main(argv) == 0
        assert "final test accuracy" in capsys.readouterr().out
        metrics = json.loads((out / "metrics.json").read_text())
        assert (metrics["config"]["engine"], metrics["config"]["world_size"]) == ("torch", 1)
        assert [row["epoch"] for row in metrics["epochs"]] == [1, 2]
        assert metrics["epochs"][1]["train_loss"] < metrics["epochs"][0]["train_loss"]
        assert main([*argv, "--epochs", "3", "--resume"]) == 0  # the later --epochs wins
    assert len(json.loads((out / "metrics.json").read_text())["epochs"]) == 3
