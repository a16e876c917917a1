"""SyncBatchNorm over gloo with 2 local processes vs single-process BN on the concatenated batch.

The two ranks run every scenario of ``_sync_worker.py`` in one launch (process start-up dominates);
a hang fails the test after 60 s instead of blocking the suite.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import bnlab.torch as bt  # noqa: E402

WORKER = Path(__file__).with_name("_sync_worker.py")
WORLD = 2
HANG_TIMEOUT_S = 60
TOL64, TOL32 = 1e-10, 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out_dir: Path) -> list[subprocess.Popen]:
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    port = _free_port()
    return [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(r), str(WORLD), str(port), str(out_dir)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(WORLD)
    ]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """{rank: {scenario: result}} from one 2-process run; fails (never hangs) after 60 s."""
    out_dir = tmp_path_factory.mktemp("sync")
    procs = _launch(out_dir)
    deadline = time.monotonic() + HANG_TIMEOUT_S
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            logs.append(out)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"2-process SyncBatchNorm run did not finish within {HANG_TIMEOUT_S} s")
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log
    return {r: json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(WORLD)}


def _no_crash(res):
    assert "crash" not in res, res.get("crash")


@pytest.mark.slow
@pytest.mark.parametrize(
    "scenario",
    [
        "even",
        "even_channels_last",
        "uneven_3_5",
        "uneven_5d",
        "even_5d_channels_last",
        "one_sample_4d",
        "one_sample_2d",
        "empty_rank",
        "uneven_float32",
    ],
)
def test_sync_bn_equals_bn_on_concatenated_batch(results, scenario):
    tol = TOL32 if "float32" in scenario else TOL64
    for rank in range(WORLD):
        res = results[rank][scenario]
        _no_crash(res)
        assert res.pop("channels_last_kept")
        for what, diff in res.items():
            assert diff <= tol, f"rank {rank} {scenario}: {what} differs by {diff}"


@pytest.mark.slow
def test_channel_mismatch_raises_on_every_rank(results):
    for rank in range(WORLD):
        err = results[rank]["mismatch"]
        assert err is not None, f"rank {rank} did not raise"
        assert err["type"] == "ShapeError" and "channels [3, 4]" in err["message"]


@pytest.mark.slow
def test_bad_input_on_one_rank_raises_on_every_rank(results):
    assert results[1]["bad_input_one_rank"] == {
        "type": "RuntimeError",
        "message": "running_mean should contain 4 elements not 3",
    }
    err0 = results[0]["bad_input_one_rank"]
    assert err0["type"] == "ShapeError" and "channels [3, 4]" in err0["message"]


@pytest.mark.slow
def test_bad_dims_on_one_rank_raise_on_every_rank(results):
    assert results[1]["bad_dims_one_rank"] == {
        "type": "ValueError",
        "message": "expected at least 2D input (got 1D input)",
    }
    err0 = results[0]["bad_dims_one_rank"]
    assert err0["type"] == "ShapeError" and "dims [4, -1]" in err0["message"]


@pytest.mark.slow
def test_nonfinite_on_one_rank_updates_no_rank(results):
    for rank in range(WORLD):
        res = results[rank]["nonfinite"]
        _no_crash(res)
        assert res == {"warned": True, "unchanged": True, "num_batches_tracked": 1}


@pytest.mark.slow
def test_ddp_syncbn_training_equals_single_process(results):
    for rank in range(WORLD):
        res = results[rank]["ddp_training"]
        _no_crash(res)
        assert res["same_keys"]
        assert res["changed"] > 1e-4  # the steps did train
        assert res["state_diff"] <= 2e-4 and res["loss_diff"] <= 1e-5, res


def test_training_without_process_group_is_a_clear_error():
    m = bt.SyncBatchNorm(3)
    with pytest.raises(RuntimeError, match="init_process_group"):
        m(torch.randn(4, 3, 2, 2))
    assert int(m.num_batches_tracked) == 0
    m.eval()
    assert m(torch.randn(4, 3, 2, 2)).shape == (4, 3, 2, 2)  # eval needs no communication


def test_combine_moments_equals_concatenated_statistics():
    from bnlab.torch.sync import combine_moments, local_moments

    g = torch.Generator().manual_seed(0)
    shards = [torch.randn(n, 3, 2, generator=g, dtype=torch.float64) + 1e3 for n in (1, 0, 6)]
    total, mean, var = combine_moments(torch.stack([local_moments(s) for s in shards]))
    full = torch.cat(shards)
    assert total == full.shape[0] * 2
    torch.testing.assert_close(mean, full.mean((0, 2)), rtol=0, atol=1e-12)
    torch.testing.assert_close(var, full.var((0, 2), correction=0), rtol=0, atol=1e-10)


def test_convert_sync_batchnorm_keeps_state():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2, momentum=None))
    model[1](torch.randn(3, 2, 2, 2))
    converted = bt.convert_sync_batchnorm(model)
    assert type(converted[1]) is bt.SyncBatchNorm and converted[1].momentum is None
    assert int(converted[1].num_batches_tracked) == 1
