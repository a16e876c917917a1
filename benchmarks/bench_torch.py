"""bnlab.torch.BatchNorm2d vs torch.nn.BatchNorm2d on CPU, measured side by side in one process.

Cases: forward+backward of one BN layer at (64, 64, 56, 56) float32, NCHW and channels_last (the
training mode a ResNet-50 stage-1 BN sees), and one LeNet-BN training step (batch 256, 28×28)
with each implementation. Every case is checked for equal results *before* it is timed; the peers
run interleaved (round robin) so that load on a shared machine hits both alike. The BN peers share
x, so clearing the previous call's gradients (``x.grad = None``) happens outside the clock: timed
inside, each peer paid for freeing the *other* one's dx. Reports median ms,
the speedup (torch / bnlab) and, for the BN layer, the achieved bandwidth against a NumPy copy
measured in the same run (fwd+bwd moves at least 5 tensors: read x, write y; read x, dy, write dx),
and the median page faults per call (first touches of freshly mapped memory, a large part of
PyTorch's time on CPU; bnlab.torch reuses freed output memory, see bnlab/torch/_buffers.py).

    python benchmarks/bench_torch.py                      # full table (Markdown) + JSON
    python benchmarks/bench_torch.py --quick              # small shapes, a smoke run
    python benchmarks/bench_torch.py --sweep              # N × C × H·W sweep, break-even sizes
    python benchmarks/bench_torch.py --sweep-compiled     # BN+ReLU under torch.compile
    python benchmarks/bench_torch.py --resnet18           # ResNet-18 step, 4 variants
    python benchmarks/bench_torch.py --table RESULT.json  # the tables of a saved run again

The sweep (``_torch_sweep.py``) times one layer over a grid of sizes, both memory formats, training
and eval, against ``nn.BatchNorm2d``: bnlab as dispatched, forced onto its kernels, and forced onto
PyTorch's op; it reports the break-even size from which the kernels win. The end-to-end case
(``_torch_resnet18.py``) times a CIFAR-style ResNet-18 training step four ways in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# What the OpenMP runtimes see: torch's reads OMP_WAIT_POLICY when torch is imported (below),
# before ``import bnlab`` sets it to PASSIVE for the numba pool when the caller has not chosen one.
OMP_WAIT_POLICY_AT_START = os.environ.get("OMP_WAIT_POLICY")
LOADAVG_AT_START = list(os.getloadavg())  # the benchmark's own threads are not in it yet

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _torch_tables import tables  # noqa: E402
from torch import nn  # noqa: E402

import bnlab  # noqa: E402
import bnlab.torch as bt  # noqa: E402
from bnlab.torch.models import lenet_bn  # noqa: E402

FORMATS = {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}


# --------------------------------------------------------------------------- timing


def minor_faults() -> int:
    """Page faults of this process so far (first touches of freshly mapped memory)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def interleaved(fns: dict, repeats: int, warmup: int, faults: dict | None = None, before=None):
    """Seconds per call of each function, calls alternating between the peers; ``faults``, when
    given, receives the page faults of each call too; ``before[name]``, when given, runs before
    each call of that peer, outside the clock."""
    before = before or {}
    for _ in range(warmup):
        for name, fn in fns.items():
            before.get(name, lambda: None)()
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            before.get(name, lambda: None)()
            f0, t0 = minor_faults(), time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            if faults is not None:
                faults.setdefault(name, []).append(minor_faults() - f0)
    return times


def copy_bandwidth_gbs(nbytes: int, repeats: int = 5) -> float:
    """Read+write bandwidth of ``np.copyto`` on arrays of ``nbytes`` (the practical limit)."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    best = min(interleaved({"copy": lambda: np.copyto(dst, src)}, repeats, 1)["copy"])
    return 2 * nbytes / best / 1e9


# --------------------------------------------------------------------------- cases


def clear_grads(module: nn.Module, x: torch.Tensor) -> None:
    """Drop the previous call's gradients. Untimed: x is shared by the peers, so whoever clears
    x.grad frees the *other* peer's dx (munmap of torch's 51 MB of 4 KB pages took ~4 ms here,
    which used to be charged to bnlab; bnlab's reused block costs a reference decrement)."""
    module.zero_grad(set_to_none=True)
    x.grad = None


def bn_layer_step(module: nn.Module, x: torch.Tensor, dy: torch.Tensor):
    """One forward+backward; returns (y, dx, dweight) for the pre-timing check."""
    y = module(x)
    y.backward(dy)
    return y, x.grad, module.weight.grad


def bn_case(shape, fmt: str):
    """(closures over identical modules and inputs, checked equal first; their untimed resets)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(memory_format=FORMATS[fmt]).requires_grad_()
    dy = torch.randn(shape, generator=g).to(memory_format=FORMATS[fmt])
    ref, ours = nn.BatchNorm2d(shape[1]), bt.BatchNorm2d(shape[1])
    results = []
    for m in (ref, ours):
        clear_grads(m, x)
        results.append(bn_layer_step(m, x, dy))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3)
    steps = {
        "torch": lambda: bn_layer_step(ref, x, dy),
        "bnlab": lambda: bn_layer_step(ours, x, dy),
    }
    resets = {"torch": lambda: clear_grads(ref, x), "bnlab": lambda: clear_grads(ours, x)}
    return steps, resets


def lenet_case(batch: int):
    """One SGD step of LeNet-BN (same init, same batch) with torch's and with bnlab's BN."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(batch, 1, 28, 28, generator=g)
    labels = torch.randint(0, 10, (batch,), generator=g)
    loss_fn = nn.CrossEntropyLoss()

    def make(norm):
        model = lenet_bn(norm, seed=0)
        opt = torch.optim.SGD(model.parameters(), lr=0.9)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), labels)
            loss.backward()
            opt.step()
            return loss.detach()

        return step

    steps = {"torch": make("torch"), "bnlab": make("bnlab")}
    torch.testing.assert_close(steps["bnlab"](), steps["torch"](), rtol=1e-4, atol=1e-5)
    return steps


# --------------------------------------------------------------------------- report


def summarize(name, times, nbytes=None, copy_gbs=None, faults=None):
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    row = {"case": name, "torch_ms": ms["torch"], "bnlab_ms": ms["bnlab"]}
    row["speedup"] = ms["torch"] / ms["bnlab"]
    for k, v in (faults or {}).items():
        row[f"{k}_page_faults"] = statistics.median(v)
    if nbytes is not None:
        row["bnlab_gbs"] = nbytes / (ms["bnlab"] / 1e3) / 1e9
        row["torch_gbs"] = nbytes / (ms["torch"] / 1e3) / 1e9
        row["bnlab_pct_of_copy"] = 100 * row["bnlab_gbs"] / copy_gbs
    return row


def set_threads(n: int) -> None:
    """The same thread count for both peers: torch intra-op and bnlab's numba kernels."""
    torch.set_num_threads(n)
    try:
        import numba
    except ImportError:
        return
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


def numba_threads() -> int | None:
    try:
        import numba
    except ImportError:
        return None
    return numba.get_num_threads()


def environment(args) -> dict:
    return {
        "bnlab_backend": bnlab.get_backend(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numba_threads": numba_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "loadavg_1_5_15_at_start": LOADAVG_AT_START,
        "loadavg_1_5_15_at_end": list(os.getloadavg()),
        "repeats": args.repeats,
        "malloc_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")},
        "omp_wait_policy_torch": OMP_WAIT_POLICY_AT_START or "unset (libgomp: active spin)",
        "omp_wait_policy_numba": os.environ.get("OMP_WAIT_POLICY"),
    }


def write(path: Path | None, payload: dict) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2) + "\n")


def run_sweep(args) -> dict:
    from _torch_sweep import summary, sweep

    rows = sweep(repeat=args.repeats, quick=args.quick)
    result = {"env": environment(args), "summary": summary(rows), "rows": rows}
    for mode, s in result["summary"].items():
        b = s["break_even_bytes"]
        where = f"{b / 2**20:g} MiB" if b else "nowhere measured"
        print(
            f"{mode}: kernels at least as fast as torch from {where}; bnlab as dispatched "
            f"{s['bnlab_speedup_min']:.2f}x-{s['bnlab_speedup_max']:.2f}x; PyTorch route "
            f"{s['pytorch_op_speedup_median']:.2f}x median, "
            f"{s['pytorch_op_speedup_min']:.2f}x worst"
        )
    print(tables(result))
    return result


def run_sweep_compiled(args) -> dict:
    from _torch_sweep import sweep_compiled

    rows = sweep_compiled(repeat=args.repeats, quick=args.quick)
    result = {"env": environment(args), "rows": rows}
    print(tables(result))
    return result


def run_resnet18(args) -> dict:
    from _torch_resnet18 import resnet18_case

    r = resnet18_case(batch=args.resnet_batch, repeat=args.repeats)
    env = environment(args)
    print(f"ResNet-18 (CIFAR) SGD step, batch {r['batch']}")
    print(tables({"env": env, **r}))
    return {"env": env, **r}


def run_layers(args) -> dict:
    if args.quick:
        args.shape, args.batch, args.repeats, args.warmup = [8, 16, 14, 14], 32, 3, 1
    shape = tuple(args.shape)
    nbytes = 5 * int(np.prod(shape)) * 4  # x, y, x, dy, dx in float32
    copy_gbs = copy_bandwidth_gbs(int(np.prod(shape)) * 4)
    rows = []
    for fmt in FORMATS:
        faults = {}
        steps, resets = bn_case(shape, fmt)
        times = interleaved(steps, args.repeats, args.warmup, faults, before=resets)
        rows.append(summarize(f"BN fwd+bwd {shape} {fmt}", times, nbytes, copy_gbs, faults))
    faults = {}
    times = interleaved(lenet_case(args.batch), args.repeats, args.warmup, faults)
    rows.append(summarize(f"LeNet-BN train step, batch {args.batch}", times, faults=faults))
    env = environment(args) | {"copy_gbs": copy_gbs}
    print(tables({"env": env, "rows": rows}))
    return {"env": env, "rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--shape", type=int, nargs=4, default=[64, 64, 56, 56], metavar=("N", "C", "H", "W")
    )
    p.add_argument("--batch", type=int, default=256, help="LeNet-BN batch size")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats (smoke test)")
    p.add_argument("--sweep", action="store_true", help="the N x C x H*W sweep, break-even sizes")
    p.add_argument("--sweep-compiled", action="store_true", help="BN+ReLU under torch.compile")
    p.add_argument("--resnet18", action="store_true", help="the end-to-end ResNet-18 step")
    p.add_argument("--resnet-batch", type=int, default=64)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--table", type=Path, default=None, help="print the tables of a saved run")
    p.add_argument("--threads", type=int, default=None, help="torch and numba threads (same)")
    args = p.parse_args(argv)
    if args.table:
        print(tables(json.loads(args.table.read_text())))
        return 0
    if args.threads:
        set_threads(args.threads)
    if args.sweep:
        write(args.json, run_sweep(args))
    if args.sweep_compiled:
        write(args.json, run_sweep_compiled(args))
    if args.resnet18:
        write(args.json, run_resnet18(args))
    if not (args.sweep or args.sweep_compiled or args.resnet18):
        write(args.json, run_layers(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
