"""One rank of the 2-process gloo tests (launched by test_torch_sync.py, not collected by pytest).

    python _sync_worker.py RANK WORLD PORT OUT_DIR

Runs every scenario against single-process batch norm on the concatenated batch (each rank can
rebuild the global batch from the seed) and writes OUT_DIR/rank{RANK}.json with the measured
differences and the errors seen; the test process makes the assertions.
"""

from __future__ import annotations

import json
import sys
import traceback
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import bnlab.torch as bt
from bnlab.errors import NonFiniteBatchWarning
from bnlab.torch.models import lenet_bn


def _max_diff(a, b) -> float:
    if a.shape != b.shape:
        return float("inf")
    if a.numel() == 0:
        return 0.0
    return float((a.detach().double() - b.detach().double()).abs().max())


def _shard(t, sizes, rank):
    start = sum(sizes[:rank])
    return t[start : start + sizes[rank]]


def stats_scenario(sizes, tail, channels_last=False, dtype=torch.float64, steps=2):
    """SyncBN forward/backward/running stats vs torch BN on the concatenated batch."""
    rank = dist.get_rank()
    c = 3
    g = torch.Generator().manual_seed(42)
    ref = {3: nn.BatchNorm3d, 2: nn.BatchNorm2d}.get(len(tail), nn.BatchNorm1d)(c, dtype=dtype)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5, generator=g)
        ref.bias.uniform_(-1, 1, generator=g)
    ours = bt.convert_sync_batchnorm(bt.convert(nn.Sequential(ref)))[0]
    ours.load_state_dict(ref.state_dict())
    diffs = {"y": 0.0, "dx": 0.0, "dweight": 0.0, "dbias": 0.0, "buffers": 0.0}
    for step in range(steps):
        x = torch.randn(sum(sizes), c, *tail, generator=g, dtype=dtype) * 2 + step
        dy = torch.randn(sum(sizes), c, *tail, generator=g, dtype=dtype)
        if channels_last:
            x = x.to(memory_format={3: torch.channels_last_3d}.get(len(tail), torch.channels_last))
        xg = x.clone().requires_grad_()
        y_ref = ref(xg)
        y_ref.backward(dy)
        xl = _shard(x, sizes, rank).clone().requires_grad_()
        ours.zero_grad()
        y = ours(xl)
        y.backward(_shard(dy, sizes, rank))
        grads = torch.stack([ours.weight.grad, ours.bias.grad])
        dist.all_reduce(grads)  # local parameter gradients add up to the global ones
        diffs["y"] = max(diffs["y"], _max_diff(y, _shard(y_ref, sizes, rank)))
        diffs["dx"] = max(diffs["dx"], _max_diff(xl.grad, _shard(xg.grad, sizes, rank)))
        diffs["dweight"] = max(diffs["dweight"], _max_diff(grads[0], ref.weight.grad))
        diffs["dbias"] = max(diffs["dbias"], _max_diff(grads[1], ref.bias.grad))
        ref.zero_grad()
        for a, b in zip(ours.buffers(), ref.buffers(), strict=True):
            diffs["buffers"] = max(diffs["buffers"], _max_diff(a, b))
    fmt = torch.channels_last_3d if len(tail) == 3 else torch.channels_last
    diffs["channels_last_kept"] = bool(not channels_last or y.is_contiguous(memory_format=fmt))
    return diffs


def _error_of(fn):
    try:
        fn()
    except Exception as err:  # recorded for the test process to check
        return {"type": type(err).__name__, "message": str(err)}
    return None


def mismatch_scenario():
    """Rank r has a (3 + r)-channel layer: every rank must raise, none may hang."""
    c = 3 + dist.get_rank()
    m = bt.SyncBatchNorm(c)
    return _error_of(lambda: m(torch.randn(4, c, 2, 2)))


def bad_input_on_one_rank_scenario():
    """Rank 1 feeds 4 channels to a 3-channel layer: rank 1 raises PyTorch's error, rank 0 too."""
    m = bt.SyncBatchNorm(3)
    c = 3 + dist.get_rank()
    return _error_of(lambda: m(torch.randn(4, c, 2, 2)))


def bad_dims_on_one_rank_scenario():
    """Rank 1 feeds a 1-D tensor: its own ValueError there, a ShapeError on rank 0, no hang."""
    m = bt.SyncBatchNorm(3)
    x = torch.randn(4, 3, 2, 2) if dist.get_rank() == 0 else torch.randn(3)
    return _error_of(lambda: m(x))


def nonfinite_scenario():
    """A NaN on rank 1 only: both ranks warn and keep their buffers."""
    m = bt.SyncBatchNorm(3)
    m(torch.randn(4, 3, 2, 2) + dist.get_rank())
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(4, 3, 2, 2)
    if dist.get_rank() == 1:
        x[0, 1, 0, 0] = float("nan")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        m(x)
    return {
        "warned": any(issubclass(w.category, NonFiniteBatchWarning) for w in seen),
        "unchanged": all(torch.equal(v, before[k]) for k, v in m.state_dict().items()),
        "num_batches_tracked": int(m.num_batches_tracked),
    }


def ddp_training_scenario(steps=3, per_rank=8, lr=0.5):
    """DDP + SyncBN LeNet-BN on 2 ranks vs one process on the global batch (same init)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = DistributedDataParallel(bt.convert_sync_batchnorm(lenet_bn("bnlab", seed=0)))
    ref = lenet_bn("torch", seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(7)
    loss_diff = 0.0
    for _ in range(steps):
        x = torch.rand(world * per_rank, 1, 28, 28, generator=g)
        labels = torch.randint(0, 10, (world * per_rank,), generator=g)
        sizes = [per_rank] * world
        opt.zero_grad()
        loss = loss_fn(model(_shard(x, sizes, rank)), _shard(labels, sizes, rank))
        loss.backward()
        opt.step()
        opt_ref.zero_grad()
        loss_ref = loss_fn(ref(x), labels)
        loss_ref.backward()
        opt_ref.step()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        loss_diff = max(loss_diff, abs(float(mean_loss) / world - float(loss_ref)))
    ours, theirs = model.module.state_dict(), ref.state_dict()
    return {
        "same_keys": list(ours) == list(theirs),
        "state_diff": max(_max_diff(ours[k], theirs[k]) for k in theirs),
        "loss_diff": loss_diff,
        "changed": _max_diff(ours["0.weight"], lenet_bn("torch", seed=0).state_dict()["0.weight"]),
    }


SCENARIOS = {
    "even": lambda: stats_scenario([4, 4], (3, 2)),
    "even_channels_last": lambda: stats_scenario([4, 4], (3, 2), channels_last=True),
    "uneven_3_5": lambda: stats_scenario([3, 5], (2, 2)),
    "one_sample_4d": lambda: stats_scenario([1, 4], (2, 3)),
    "one_sample_2d": lambda: stats_scenario([1, 3], ()),
    "empty_rank": lambda: stats_scenario([0, 5], (2, 2)),
    "uneven_float32": lambda: stats_scenario([3, 5], (2, 2), dtype=torch.float32),
    "uneven_5d": lambda: stats_scenario([3, 5], (2, 2, 3)),
    "even_5d_channels_last": lambda: stats_scenario([4, 4], (2, 3, 2), channels_last=True),
    "mismatch": mismatch_scenario,
    "bad_input_one_rank": bad_input_on_one_rank_scenario,
    "bad_dims_one_rank": bad_dims_on_one_rank_scenario,
    "nonfinite": nonfinite_scenario,
    "ddp_training": ddp_training_scenario,
}


def main(rank: int, world: int, port: int, out_dir: Path) -> int:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=timedelta(seconds=40),
    )  # fmt: skip
    results = {}
    for name, fn in SCENARIOS.items():
        try:
            results[name] = fn()
        except Exception:  # a crash is a result too: the test shows it
            results[name] = {"crash": traceback.format_exc()}
        dist.barrier()
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    r, w, p, out = sys.argv[1:5]
    raise SystemExit(main(int(r), int(w), int(p), Path(out)))
