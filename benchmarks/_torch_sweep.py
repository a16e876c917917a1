"""The size sweep of ``bench_torch.py --sweep``: one BN layer over a grid of N, C and H·W, both
memory formats, training (forward + backward) and eval (forward, no grad). Peers, interleaved in
the same process and checked equal before timing:

* ``torch``   — ``nn.BatchNorm2d``;
* ``bnlab``   — ``bnlab.torch.BatchNorm2d`` as it runs by default (the dispatch decides);
* ``kernels`` — the same, forced onto bnlab's kernels (``kernel_route("always")``);
* ``pytorch-op`` — the same, forced onto PyTorch's op (``kernel_route("never")``): bnlab's
  overhead on that route (argument checks, the running-statistics guard).

From the ``kernels`` column, the break-even size per mode and memory format: the smallest x (in
bytes) from which the kernels are at least as fast as ``torch`` in every measured case of that
size or larger (what ``bnlab.torch.dispatch.BREAK_EVEN_BYTES`` is set from).
"""

from __future__ import annotations

import itertools
import statistics

import torch
from _bench_common import time_interleaved
from torch import nn

import bnlab.torch as bt

FORMATS = {"NCHW": torch.contiguous_format, "NHWC": torch.channels_last}
GRID = {"n": (8, 32, 128), "c": (16, 64, 256), "hw": (1, 4, 8, 16, 32)}  # hw: H = W
MAX_ELEMENTS = 1 << 23  # 32 MB of float32: the largest cases take tens of ms per call
EVAL_LARGE = ((64, 64, 56), (128, 128, 32))  # 49 and 64 MiB, eval only: where page faults start
ROUTES = {"bnlab": "auto", "kernels": "always", "pytorch-op": "never"}


def paired_speedup(times: dict, base: str, peer: str) -> float:
    """Median over rounds of base/peer within the same round: the peers ran back to back in
    each round, so a burst of load that slows a round slows both (ratios of medians taken over
    different rounds move with the load)."""
    pairs = zip(times[base]["runs_ms"], times[peer]["runs_ms"], strict=True)
    return statistics.median(b / p for b, p in pairs)


def grid(quick: bool = False, training: bool = True):
    if quick:
        return [(8, 16, 4), (32, 64, 8), (64, 64, 32)]
    cases = itertools.product(GRID["n"], GRID["c"], GRID["hw"])
    small = [(n, c, hw) for n, c, hw in cases if n * c * hw * hw <= MAX_ELEMENTS]
    return small if training else small + list(EVAL_LARGE)


def _step(module, x, dy, route: str, training: bool):
    def run():
        with bt.dispatch.kernel_route(route):
            if not training:
                with torch.no_grad():
                    return module(x)
            x.grad = None
            module.zero_grad(set_to_none=True)
            y = module(x)
            y.backward(dy)
            return y

    return run


def measure_case(n, c, hw, fmt, training, repeat):
    """Times (ms) of every peer on one layer shape; results checked equal first."""
    g = torch.Generator().manual_seed(n * 1000 + c * 10 + hw)
    x = torch.randn(n, c, hw, hw, generator=g).to(memory_format=FORMATS[fmt])
    x.requires_grad_(training)
    dy = torch.randn(x.shape, generator=g).to(memory_format=FORMATS[fmt])
    ref = nn.BatchNorm2d(c).train(training)
    ours = {name: bt.BatchNorm2d(c).train(training) for name in ROUTES}
    steps = {"torch": _step(ref, x, dy, "auto", training)}
    steps |= {name: _step(m, x, dy, ROUTES[name], training) for name, m in ours.items()}
    want = steps["torch"]().detach()
    for name in ROUTES:
        torch.testing.assert_close(steps[name]().detach(), want, rtol=1e-3, atol=1e-3)
    repeat = max(5, min(repeat, int(4e7 / x.numel())))  # more rounds for the fast small cases
    times = time_interleaved(steps, repeat=repeat, warmup=2)
    row = {"n": n, "c": c, "hw": hw * hw, "format": fmt, "training": training}
    row["elements"] = x.numel()
    row["bytes"] = x.numel() * x.element_size()
    for name, t in times.items():
        row[f"{name}_ms"] = t["median_ms"]
    for name in ROUTES:
        row[f"{name}_speedup"] = paired_speedup(times, "torch", name)
    return row


def sweep(repeat: int = 15, quick: bool = False, log=print):
    rows = []
    for training in (True, False):
        for fmt in FORMATS:
            for n, c, hw in grid(quick, training):
                row = measure_case(n, c, hw, fmt, training, repeat)
                rows.append(row)
                log(
                    f"{'train' if training else 'eval '} {fmt} N={n:<4} C={c:<4} HW={hw * hw:<5}"
                    f" {row['torch_ms']:8.3f} ms torch | bnlab {row['bnlab_speedup']:5.2f}x"
                    f" kernels {row['kernels_speedup']:5.2f}x"
                    f" pytorch-op {row['pytorch-op_speedup']:5.2f}x"
                )
    return rows


def break_even(rows, training: bool, fmt: str, margin: float = 1.0) -> int | None:
    """Smallest x in bytes from which every measured case of this mode and format is at least
    ``margin`` times as fast on the kernels as in torch; None if no such size was measured."""
    cases = [r for r in rows if r["training"] == training and r["format"] == fmt]
    cases.sort(key=lambda r: r["bytes"])
    slow = [r["bytes"] for r in cases if r["kernels_speedup"] < margin]
    if not slow:
        return cases[0]["bytes"] if cases else None
    above = [r["bytes"] for r in cases if r["bytes"] > max(slow)]
    return min(above) if above else None


def summary(rows) -> dict:
    """Per mode and format: the break-even size, and the worst and best default-route speedups."""
    out = {}
    for training, fmt in itertools.product((True, False), FORMATS):
        mine = [r for r in rows if r["training"] == training and r["format"] == fmt]
        out[f"{'train' if training else 'eval'} {fmt}"] = {
            "break_even_bytes": break_even(rows, training, fmt),
            "bnlab_speedup_min": min(r["bnlab_speedup"] for r in mine),
            "bnlab_speedup_max": max(r["bnlab_speedup"] for r in mine),
            "pytorch_op_speedup_min": min(r["pytorch-op_speedup"] for r in mine),
            "pytorch_op_speedup_median": statistics.median(r["pytorch-op_speedup"] for r in mine),
        }
    return out


COMPILED_SHAPES = (
    (64, 128, 32, 32),
    (64, 64, 32, 32),
    (64, 128, 16, 16),
    (64, 256, 8, 8),
    (64, 512, 4, 4),
)


def measure_compiled(shape, fmt, training, repeat):
    """BN + ReLU under ``torch.compile`` (inductor): ``nn.BatchNorm2d`` against bnlab forced onto
    its kernels (the custom ops in the graph) and onto PyTorch's op (inductor's batch norm plus
    bnlab's branch-free running-statistics rule)."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g).to(memory_format=FORMATS[fmt]).requires_grad_(training)
    dy = torch.randn(shape, generator=g).to(memory_format=FORMATS[fmt])
    c = shape[1]

    def layer(bn):
        return torch.compile(nn.Sequential(bn, nn.ReLU()).train(training), fullgraph=True)

    steps = {"torch": _step(layer(nn.BatchNorm2d(c)), x, dy, "auto", training)}
    for name in ("kernels", "pytorch-op"):
        steps[name] = _step(layer(bt.BatchNorm2d(c)), x, dy, ROUTES[name], training)
    want = steps["torch"]().detach()  # compiles
    for name in ("kernels", "pytorch-op"):
        torch.testing.assert_close(steps[name]().detach(), want, rtol=1e-3, atol=1e-3)
    times = time_interleaved(steps, repeat=repeat, warmup=2)
    row = {"shape": list(shape), "format": fmt, "training": training, "compiled": True}
    row["bytes"] = x.numel() * x.element_size()
    for name, t in times.items():
        row[f"{name}_ms"] = t["median_ms"]
    for name in ("kernels", "pytorch-op"):
        row[f"{name}_speedup"] = paired_speedup(times, "torch", name)
    return row


def sweep_compiled(repeat: int = 9, quick: bool = False, log=print):
    rows = []
    shapes = COMPILED_SHAPES[:1] if quick else COMPILED_SHAPES
    for training in (True, False):
        for fmt in FORMATS:
            for shape in shapes:
                row = measure_compiled(shape, fmt, training, repeat)
                rows.append(row)
                log(
                    f"compiled {'train' if training else 'eval '} {fmt} {shape}"
                    f" {row['torch_ms']:8.3f} ms torch | kernels {row['kernels_speedup']:5.2f}x"
                    f" pytorch-op {row['pytorch-op_speedup']:5.2f}x"
                )
    return rows
