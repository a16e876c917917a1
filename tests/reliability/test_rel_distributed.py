"""Distributed faults (SyncBatchNorm over gloo): a rank that dies, stalls or never joins makes
the others fail with an error instead of hanging; a NaN on one rank updates no rank (then that
rank stalls, for the time-out scenario: one process pair serves both, to keep the suite short).

All scenarios run concurrently (one process per rank) from a module fixture; the test never
waits on a peer itself: a hang shows as a worker that does not finish before the harness limit.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("torch.distributed")

FAMILY = "distributed faults"
FAMILIES = {"test_nan_on_one_rank_updates_no_rank": "non-finite batches"}
WORKER = Path(__file__).with_name("dist_worker.py")
HARNESS_LIMIT = 150  # seconds: far above the 4 s process-group timeout; reaching it means a hang
# (scenario, ranks started, world size)
LAUNCH = [("nonfinite", 2, 2), ("rank_dies", 2, 2), ("never_joins", 1, 2)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist")
    procs = {}
    for name, started, world in LAUNCH:
        port = _free_port()
        for rank in range(started):
            out = folder / f"{name}.{rank}.json"
            cmd = [sys.executable, str(WORKER), name, str(rank), str(world), str(port), str(out)]
            procs[(name, rank)] = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
    deadline = time.monotonic() + HARNESS_LIMIT
    results = {}
    for key, proc in procs.items():
        if key == ("nonfinite", 1):
            continue  # it stalls after the NaN step: killed once its peer has reported
        try:
            log, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            log, _ = proc.communicate()
            results[key] = {"hung": True, "log": log[-3000:]}
            continue
        results[key] = _result(folder / f"{key[0]}.{key[1]}.json", proc.returncode, log)
    staller = procs[("nonfinite", 1)]
    staller.send_signal(signal.SIGKILL)
    log, _ = staller.communicate()
    results[("nonfinite", 1)] = _result(folder / "nonfinite.1.json", "killed by the test", log)
    return results


def _result(out: Path, returncode, log: str) -> dict:
    data = json.loads(out.read_text()) if out.exists() else {}
    return {"returncode": returncode, "log": log[-3000:], **data}


def _failed_cleanly(res: dict) -> dict:
    assert not res.get("hung"), f"worker hung (no error within {HARNESS_LIMIT} s):\n{res['log']}"
    assert res.get("returncode") == 0, res.get("log")
    err = res["error"]
    assert err["type"] is not None, "the collective returned although a peer was gone"
    return err


def test_rank_that_dies_makes_the_others_fail(outcomes):
    assert outcomes[("rank_dies", 1)]["returncode"] == 17  # it really died
    err = _failed_cleanly(outcomes[("rank_dies", 0)])
    assert err["message"].strip(), err


def test_rank_that_stalls_makes_the_others_time_out(outcomes):
    res = outcomes[("nonfinite", 0)]
    err = _failed_cleanly({**res, "error": res.get("stall_error")})
    assert "timed out" in err["message"].lower() or "timeout" in err["message"].lower(), err


def test_rank_that_never_joins_makes_the_rendezvous_fail(outcomes):
    err = _failed_cleanly(outcomes[("never_joins", 0)])
    assert "1/2" in err["message"] or "timed out" in err["message"].lower(), err


def test_nan_on_one_rank_updates_no_rank(outcomes):
    r0, r1 = outcomes[("nonfinite", 0)], outcomes[("nonfinite", 1)]
    for r in (r0, r1):
        assert "warned" in r, r.get("log")
        assert r["warned"] and r["unchanged"], r
    assert r0["buffers"] == r1["buffers"]  # all ranks agree
