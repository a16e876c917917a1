"""bnlab.torch.train: torchrun DDP+SyncBN LeNet-BN equals one process; outputs; resume."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bnlab.checkpoint import load_checkpoint  # noqa: E402
from bnlab.torch.launch import launch, torchrun_command  # noqa: E402
from bnlab.torch.train import Dist, shard, train  # noqa: E402
from bnlab.train import Splits, TrainConfig  # noqa: E402

HANG_TIMEOUT_S = 60
EPOCH_KEYS = {"epoch", "train_loss", "train_acc", "test_acc", "examples_per_s", "seconds"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_all(cmds: list[list[str]]) -> None:
    """Run the commands concurrently; each must succeed, all within HANG_TIMEOUT_S."""
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    procs = [
        subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for c in cmds
    ]
    deadline = time.monotonic() + HANG_TIMEOUT_S
    try:
        logs = [p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"training runs did not finish within {HANG_TIMEOUT_S} s")
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_process(fashion_mnist_dir, tmp_path):
    args = ["--epochs", "1", "--batch-size", "128", "--train-limit", "1024", "--test-limit", "500"]
    args += ["--threads", "1", "--data", str(fashion_mnist_dir)]
    one, two = tmp_path / "one", tmp_path / "two"
    _run_all(
        [
            [sys.executable, "-m", "bnlab.torch.train", *args, "--out", str(one)],
            torchrun_command([*args, "--out", str(two)], 2, _free_port()),
        ]
    )
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))

    assert m2["config"]["world_size"] == 2 and m1["config"]["world_size"] == 1
    for m in (m1, m2):
        assert set(m["epochs"][0]) == EPOCH_KEYS
    e1, e2 = m1["epochs"][0], m2["epochs"][0]
    assert abs(e1["train_loss"] - e2["train_loss"]) <= 1e-4 * e1["train_loss"]
    assert abs(e1["train_acc"] - e2["train_acc"]) <= 2 / 1024  # a flipped argmax or two
    assert abs(e1["test_acc"] - e2["test_acc"]) <= 2 / 500
    w1 = load_checkpoint(one, expect_model="lenet-bn").model_state
    w2 = load_checkpoint(two, expect_model="lenet-bn").model_state
    assert list(w1) == list(w2)
    for k in w1:
        np.testing.assert_allclose(w2[k], w1[k], rtol=1e-3, atol=1e-3, err_msg=k)
    assert (two / "report.md").is_file() and (two / "loss.png").is_file()


def _synthetic_splits(n=96, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, 80, (n, 28, 28)).astype(np.uint8)
    for i, c in enumerate(labels):
        images[i, 2 * c + 4 : 2 * c + 6] = 255  # a learnable band per class
    return Splits(images, labels, images[:48], labels[:48])


def test_resume_continues_exactly(tmp_path, one_thread):
    splits = _synthetic_splits()
    quiet = dict(ctx=Dist(), splits=splits, log=lambda s: None, report=False)
    full = train(TrainConfig(epochs=2, batch_size=32, lr=0.5), tmp_path / "full", **quiet)
    train(TrainConfig(epochs=1, batch_size=32, lr=0.5), tmp_path / "part", **quiet)
    resumed = train(
        TrainConfig(epochs=2, batch_size=32, lr=0.5), tmp_path / "part", resume=True, **quiet
    )
    for a, b in zip(full["epochs"], resumed["epochs"], strict=True):
        assert a["train_loss"] == b["train_loss"] and a["test_acc"] == b["test_acc"]
    wa = load_checkpoint(tmp_path / "full").model_state
    wb = load_checkpoint(tmp_path / "part").model_state
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)


def test_refuses_to_overwrite_a_run_and_a_changed_config(tmp_path, one_thread):
    splits = _synthetic_splits(32)
    quiet = dict(ctx=Dist(), splits=splits, log=lambda s: None, report=False)
    train(TrainConfig(epochs=1, batch_size=16), tmp_path, **quiet)
    with pytest.raises(FileExistsError, match="--resume"):
        train(TrainConfig(epochs=1, batch_size=16), tmp_path, **quiet)
    with pytest.raises(ValueError, match="batch_size"):
        train(TrainConfig(epochs=2, batch_size=8), tmp_path, resume=True, **quiet)


@pytest.mark.parametrize("n", [0, 1, 7, 128])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_cover_the_batch_evenly(n, world):
    parts = [shard(n, Dist(r, world)) for r in range(world)]
    sizes = [p.stop - p.start for p in parts]
    assert sum(sizes) == n and max(sizes) - min(sizes) <= 1
    assert [p.start for p in parts[1:]] == [p.stop for p in parts[:-1]]


@pytest.mark.parametrize("nproc", [0, -1, 1.5, True])
def test_launch_rejects_bad_process_counts(nproc):
    with pytest.raises(ValueError, match="nproc"):
        launch(["--out", "unused"], nproc)
