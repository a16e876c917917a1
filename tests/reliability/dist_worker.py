"""One rank of the distributed-fault scenarios (launched by test_rel_distributed.py).

    python dist_worker.py SCENARIO RANK WORLD PORT OUT_JSON

Writes OUT_JSON with what this rank saw (errors as type + message); the test asserts.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

import bnlab.torch as bt
from bnlab.errors import NonFiniteBatchWarning

PG_TIMEOUT = timedelta(seconds=4)


def _error(fn) -> dict:
    start = time.monotonic()
    try:
        fn()
    except Exception as err:
        return {"type": type(err).__name__, "message": str(err)[:2000],
                "seconds": time.monotonic() - start}  # fmt: skip
    return {"type": None, "seconds": time.monotonic() - start}


def _init(rank: int, world: int, port: int) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=PG_TIMEOUT,
    )  # fmt: skip


def nonfinite(rank, world, port):
    """A NaN on rank 1: no rank updates. Then rank 1 stalls: rank 0 must time out."""
    _init(rank, world, port)
    m = bt.SyncBatchNorm(3)
    torch.manual_seed(rank)
    m(torch.randn(4, 3, 2, 2))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(4, 3, 2, 2)
    if rank == 1:
        x[2, 1, 0, 1] = float("nan")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        m(x)
    out = {
        "warned": any(issubclass(w.category, NonFiniteBatchWarning) for w in seen),
        "unchanged": all(torch.equal(v, before[k]) for k, v in m.state_dict().items()),
        "buffers": {k: v.tolist() for k, v in m.state_dict().items() if "running" in k},
    }
    # then rank 1 stalls: alive but never reaching the next collective (the test kills it)
    if rank == 1:
        Path(sys.argv[5]).write_text(json.dumps(out))
        time.sleep(600)
    out["stall_error"] = _error(lambda: m(torch.randn(4, 3, 2, 2)))
    return out


def rank_dies(rank, world, port):
    _init(rank, world, port)
    dist.barrier()  # both joined
    if rank == 1:
        os._exit(17)  # dies without a word, as a crashed or OOM-killed rank would
    time.sleep(0.5)
    m = bt.SyncBatchNorm(3)
    return {"error": _error(lambda: m(torch.randn(4, 3, 2, 2)))}


def never_joins(rank, world, port):
    # rank 1 is never started: the rendezvous must give up with an error
    return {"error": _error(lambda: _init(rank, world, port))}


SCENARIOS = {f.__name__: f for f in (nonfinite, rank_dies, never_joins)}


if __name__ == "__main__":
    torch.set_num_threads(1)
    name, rank, world, port, out = sys.argv[1:6]
    result = SCENARIOS[name](int(rank), int(world), int(port))
    Path(out).write_text(json.dumps(result))
    os._exit(0)  # skip process-group teardown, which can block when a peer is gone
