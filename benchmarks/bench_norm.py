"""Batch-norm speed: PyTorch vs the NumPy reference vs bnlab's numba kernels, against the
memory-bandwidth limit measured in the same run.

    .venv/bin/python benchmarks/bench_norm.py            # full table, JSON in benchmarks/results/
    .venv/bin/python benchmarks/bench_norm.py --quick    # small shapes, a smoke test

Per shape and operation: median ms over interleaved rounds, speed-up vs PyTorch (>1: faster than
PyTorch), achieved GB/s counting the bytes that must move, % of the bandwidth limit (a NumPy copy
of the same bytes, read + write), and the peak extra memory of the bnlab call. Bytes that must move
(N = bytes of x): training forward 3N (read x twice, write y), eval forward 2N, forward+backward 8N
(forward 3N; backward reads x and dy twice, writes dx: 5N). The limit is a copy of x into an
existing buffer (2N moved), the faster of a NumPy copy (one thread) and an all-threads numba copy,
timed as peers in the same interleaved rounds, so it sees the same load as the kernels; "% of
limit" is the ratio of the medians (or of the best rounds). It is a copy's streaming speed, not a
hard ceiling: a kernel whose second pass finds part of x still in the last-level cache, or that
avoids the copy's write-allocate traffic, can reach ~100% or a little more.

Implementations: ``torch`` is ``F.batch_norm`` (autograd for the backward, same thread count);
``numpy`` is ``bnlab.functional`` with backend="numpy"; ``bnlab`` the same public function with
backend="numba" (allocating its outputs, as PyTorch does); ``bnlab+out`` writes into reused buffers
(``out=`` for the forward; the kernels' ``dx=`` for the backward).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial
from pathlib import Path

# PyTorch and numba each bring an OpenMP runtime; with the default (spinning) wait policy the idle
# threads of one steal the cores from the other, and interleaved timings measure that fight
# (medians 100x the best round were seen). Passive waiting, set before either runtime loads, lets
# both run at full speed in one process. An explicit OMP_WAIT_POLICY from the caller is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_common import (  # noqa: E402
    copy_limit,
    format_table,
    machine_info,
    malloc_env,
    parallel_copy,
    peak_extra_bytes,
    result_name,
    time_interleaved,
    write_json,
)

FULL_CASES = [  # (shape in its layout, layout)
    ((64, 64, 56, 56), "NCHW"),
    ((64, 56, 56, 64), "NHWC"),
    ((32, 256, 14, 14), "NCHW"),
    ((8, 2048, 7, 7), "NCHW"),
    ((256, 4096), "NC"),
]
QUICK_CASES = [((8, 16, 28, 28), "NCHW"), ((8, 28, 28, 16), "NHWC"), ((64, 512), "NC")]
BYTES_MOVED = {"train_fwd": 3, "eval_fwd": 2, "fwd_bwd": 8}  # multiples of x.nbytes


class Case:
    """One shape: the data, the buffers, and each implementation's three operations."""

    def __init__(self, shape, layout, seed=0):
        import torch

        self.shape, self.layout = shape, layout
        rng = np.random.default_rng(seed)
        self.c = shape[-1] if layout in ("NHWC", "NLC") else shape[1]
        self.x = rng.standard_normal(shape).astype(np.float32)
        self.dy = rng.standard_normal(shape).astype(np.float32)
        self.w = (1 + 0.1 * rng.standard_normal(self.c)).astype(np.float32)
        self.b = (0.1 * rng.standard_normal(self.c)).astype(np.float32)
        self.rm, self.rv = np.zeros(self.c, np.float32), np.ones(self.c, np.float32)
        self.out, self.dx = np.empty_like(self.x), np.empty_like(self.x)
        to_nchw = (lambda a: a.permute(0, 3, 1, 2)) if layout == "NHWC" else (lambda a: a)
        # NHWC data seen by torch as an NCHW tensor in channels_last memory format (no copy)
        self.tx = to_nchw(torch.from_numpy(self.x))
        self.tdy = to_nchw(torch.from_numpy(self.dy))
        self.txg = self.tx.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
        self.tw, self.tb = torch.from_numpy(self.w), torch.from_numpy(self.b)
        self.twg = self.tw.clone().requires_grad_(True)
        self.tbg = self.tb.clone().requires_grad_(True)
        self.trm, self.trv = torch.zeros(self.c), torch.ones(self.c)

    # ------------------------------------------------------------------ torch
    def torch_ops(self):
        import torch
        import torch.nn.functional as F

        def train_fwd():
            with torch.no_grad():
                return F.batch_norm(self.tx, self.trm, self.trv, self.tw, self.tb, training=True)

        def eval_fwd():
            with torch.no_grad():
                return F.batch_norm(self.tx, self.trm, self.trv, self.tw, self.tb, training=False)

        def fwd_bwd():
            self.txg.grad = self.twg.grad = self.tbg.grad = None
            y = F.batch_norm(self.txg, self.trm, self.trv, self.twg, self.tbg, training=True)
            y.backward(self.tdy)
            return self.txg.grad

        return {"train_fwd": train_fwd, "eval_fwd": eval_fwd, "fwd_bwd": fwd_bwd}

    # ------------------------------------------------------------------ bnlab functional
    def functional_ops(self, backend, out=None):
        from bnlab.functional import batch_norm_backward, batch_norm_forward

        def fwd(training):
            return batch_norm_forward(
                self.x, self.w, self.b, training=training, running_mean=self.rm,
                running_var=self.rv, layout=self.layout, backend=backend, out=out,
            )  # fmt: skip

        def fwd_bwd():
            _, cache = fwd(True)
            return batch_norm_backward(self.dy, cache)

        return {
            "train_fwd": lambda: fwd(True),
            "eval_fwd": lambda: fwd(False),
            "fwd_bwd": fwd_bwd,
        }

    def kernel_fwd_bwd_reused(self):
        """Forward + backward straight through the kernels, into reused out/dx buffers."""
        from bnlab import kernels

        cl = self.layout in ("NHWC", "NLC", "NC")
        x3 = (
            self.x.reshape(self.shape[0], -1, self.c) if cl else self.x.reshape(*self.shape[:2], -1)
        )
        dy3, out3, dx3 = (a.reshape(x3.shape) for a in (self.dy, self.out, self.dx))

        def run():
            _, mean, var = kernels.bn_train_forward(x3, self.w, self.b, 1e-5, cl, out=out3)
            rstd = (1.0 / np.sqrt(var + np.float32(1e-5))).astype(np.float32)
            return kernels.bn_backward(dy3, x3, mean, rstd, self.w, cl, dx=dx3)

        return run


def _explain(x, layout, **kw) -> dict:
    """What the timed bnlab call runs: the default backend's choice and the kernels' plan."""
    from bnlab.kernels import explain

    return {"default": explain(x, layout, **kw).backend,
            "numba": explain(x, layout, backend="numba", **kw).as_dict()}  # fmt: skip


def rounds_for(nbytes: int, repeat: int) -> int:
    """Interleaved rounds for a tensor of ``nbytes``: calls on cache-sized tensors last ~1 ms, so
    they get 10x the rounds (a median of 15 single-millisecond calls moves with every hiccup)."""
    return repeat if nbytes >= 16 << 20 else 10 * repeat


def bench_case(shape, layout, repeat, numpy_repeat):
    case = Case(shape, layout)
    torch_ops = case.torch_ops()
    bn_ops = case.functional_ops("numba")
    bn_out_ops = case.functional_ops("numba", out=case.out)
    bn_out_ops["fwd_bwd"] = case.kernel_fwd_bwd_reused()
    np_ops = case.functional_ops("numpy")
    copy_dst = np.empty_like(case.x)
    rows = []
    for op in ("train_fwd", "eval_fwd", "fwd_bwd"):
        peers = {
            "torch": torch_ops[op],
            "bnlab": bn_ops[op],
            "bnlab+out": bn_out_ops[op],
            # the limit, under the same load: one-thread NumPy copy and an all-threads copy
            "copy": lambda: np.copyto(copy_dst, case.x),
            "copy_parallel": lambda: parallel_copy(copy_dst, case.x),
        }
        t = time_interleaved(peers, repeat=rounds_for(case.x.nbytes, repeat), warmup=2)
        limit = copy_limit(t, case.x.nbytes)
        t["numpy"] = time_interleaved({"numpy": np_ops[op]}, repeat=numpy_repeat)["numpy"]
        moved = BYTES_MOVED[op] * case.x.nbytes
        best = t["bnlab+out"]["median_ms"]
        rows.append(
            {
                "shape": "x".join(map(str, shape)),
                "layout": layout,
                "op": op,
                "torch_ms": t["torch"]["median_ms"],
                "numpy_ms": t["numpy"]["median_ms"],
                "bnlab_ms": t["bnlab"]["median_ms"],
                "bnlab_out_ms": best,
                "speedup": t["torch"]["median_ms"] / t["bnlab"]["median_ms"],
                "speedup_out": t["torch"]["median_ms"] / best,
                "gbs": moved / best / 1e6,
                "limit_gbs": limit["median_gbs"],
                "pct_limit": 100.0 * moved / best / 1e6 / limit["median_gbs"],
                "speedup_best": t["torch"]["min_ms"] / t["bnlab"]["min_ms"],
                "pct_limit_best": 100.0
                * moved
                / t["bnlab+out"]["min_ms"]
                / 1e6
                / limit["best_gbs"],
                "explain": _explain(case.x, layout, training=op != "eval_fwd"),
                "peak_extra_mb": peak_extra_bytes(bn_ops[op]) / 2**20,
                "peak_extra_out_mb": peak_extra_bytes(bn_out_ops[op]) / 2**20,
                "bytes_moved": moved,
                "times": t,
            }
        )
    return rows


FAMILY_CASES = [("layer_norm", (8192, 1024), None), ("group_norm", (32, 256, 14, 14), 32)]
FAMILY_QUICK = [("layer_norm", (256, 128), None), ("group_norm", (4, 16, 7, 7), 4)]


def family_ops(kind, shape, groups):
    """Forward+backward of layer norm / group norm: torch autograd, NumPy reference, kernels."""
    import torch
    import torch.nn.functional as F

    from bnlab.functional import (
        group_norm_backward,
        group_norm_forward,
        layer_norm_backward,
        layer_norm_forward,
    )

    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    p = shape[-1] if kind == "layer_norm" else shape[1]
    w = (1 + 0.1 * rng.standard_normal(p)).astype(np.float32)
    b = (0.1 * rng.standard_normal(p)).astype(np.float32)
    tx = torch.from_numpy(x).requires_grad_(True)
    tw, tb = torch.from_numpy(w).requires_grad_(True), torch.from_numpy(b).requires_grad_(True)
    tdy = torch.from_numpy(dy)

    def torch_run():
        tx.grad = tw.grad = tb.grad = None
        if kind == "layer_norm":
            y = F.layer_norm(tx, (p,), tw, tb)
        else:
            y = F.group_norm(tx, groups, tw, tb)
        y.backward(tdy)

    def numpy_run():
        if kind == "layer_norm":
            _, cache = layer_norm_forward(x, p, w, b, backend="numpy")
            return layer_norm_backward(dy, cache)
        _, cache = group_norm_forward(x, groups, w, b, backend="numpy")
        return group_norm_backward(dy, cache)

    def kernel_run():  # the public API on the kernels, outputs from bnlab.buffers like BN's
        if kind == "layer_norm":
            _, cache = layer_norm_forward(x, p, w, b, backend="numba")
            return layer_norm_backward(dy, cache)
        _, cache = group_norm_forward(x, groups, w, b, backend="numba")
        return group_norm_backward(dy, cache)

    return x, {"torch": torch_run, "numpy": numpy_run, "bnlab": kernel_run}


def bench_family(cases, repeat):
    rows = []
    for kind, shape, groups in cases:
        x, ops = family_ops(kind, shape, groups)
        dst = np.empty_like(x)
        ops["copy"] = lambda x=x, dst=dst: np.copyto(dst, x)
        ops["copy_parallel"] = lambda x=x, dst=dst: parallel_copy(dst, x)
        t = time_interleaved(ops, repeat=rounds_for(x.nbytes, repeat), warmup=2)
        moved = BYTES_MOVED["fwd_bwd"] * x.nbytes
        limit = copy_limit(t, x.nbytes)
        rows.append(
            {
                "norm": kind,
                "shape": "x".join(map(str, shape)),
                "groups": groups,
                "torch_ms": t["torch"]["median_ms"],
                "numpy_ms": t["numpy"]["median_ms"],
                "bnlab_ms": t["bnlab"]["median_ms"],
                "speedup": t["torch"]["median_ms"] / t["bnlab"]["median_ms"],
                "speedup_vs_numpy": t["numpy"]["median_ms"] / t["bnlab"]["median_ms"],
                "pct_limit": 100.0 * moved / t["bnlab"]["median_ms"] / 1e6 / limit["median_gbs"],
                "explain": _explain(
                    x, "NCHW" if kind == "group_norm" else "NC", norm=kind, num_groups=groups
                ),  # fmt: skip
                "times": t,
            }
        )
    return rows


FAMILY_TABLE = [
    ("norm", "fwd+bwd", ""),
    ("shape", "shape", ""),
    ("groups", "G", ""),
    ("torch_ms", "PyTorch ms", ".2f"),
    ("numpy_ms", "NumPy ref ms", ".1f"),
    ("bnlab_ms", "bnlab kernels ms", ".2f"),
    ("speedup", "x PyTorch", ".2f"),
    ("speedup_vs_numpy", "x NumPy ref", ".1f"),
    ("pct_limit", "% of copy limit", ".0f"),
]


def _machine() -> dict:
    from bnlab.kernels import machine

    return machine.describe()


def first_call_seconds() -> float:
    """First call of every kernel on small float32 arrays: numba compilation, or loading it from
    the on-disk cache (cache=True) when an earlier run compiled it. Not part of any median."""
    t0 = time.perf_counter()
    Case((4, 3, 5, 5), "NCHW").kernel_fwd_bwd_reused()()
    Case((4, 5, 5, 3), "NHWC").kernel_fwd_bwd_reused()()
    from bnlab.functional import batch_norm_forward

    x = np.ones((4, 3, 5, 5), np.float32)
    batch_norm_forward(x, None, None, training=False, running_mean=np.zeros(3, np.float32),
                       running_var=np.ones(3, np.float32), backend="numba")  # fmt: skip
    return time.perf_counter() - t0


TABLE = [
    ("shape", "shape", ""),
    ("layout", "layout", ""),
    ("op", "op", ""),
    ("torch_ms", "PyTorch ms", ".2f"),
    ("numpy_ms", "NumPy ref ms", ".1f"),
    ("bnlab_ms", "bnlab ms", ".2f"),
    ("speedup", "x PyTorch", ".2f"),
    ("bnlab_out_ms", "bnlab+out ms", ".2f"),
    ("speedup_out", "x PyTorch (+out)", ".2f"),
    ("gbs", "GB/s (+out)", ".1f"),
    ("pct_limit", "% of copy limit", ".0f"),
    ("speedup_best", "x PyTorch (best round)", ".2f"),
    ("pct_limit_best", "% of limit (best round)", ".0f"),
    ("peak_extra_mb", "peak extra MB", ".1f"),
    ("peak_extra_out_mb", "peak extra MB (+out)", ".2f"),
]


def layout_ratio(repeat: int) -> dict:
    """NHWC vs NCHW time of the same (64, 64, 56, 56) tensor, interleaved against each other (the
    table's rows for the two layouts are taken minutes apart, under whatever load there was).

    The training-forward rounds also time an estimate of the NHWC floor: its statistics need
    every value of x before the first output, so it reads x once for them and again to write y.
    The estimate is PyTorch's own reduction reading the same x (``torch.sum``) plus bnlab's NHWC
    eval forward (one read, one streaming write); ``floor_ratio`` is their sum over the NCHW
    training forward. bnlab's own NHWC statistics pass is timed next to them. (Medians of calls
    timed separately: an estimate, not a bound; the extra peers also make these rounds unlike
    the table's.)"""
    import torch

    from bnlab.kernels import channel_moments

    cases = {
        layout: Case(shape, layout)
        for shape, layout in (((64, 64, 56, 56), "NCHW"), ((64, 56, 56, 64), "NHWC"))
    }
    ops = {layout: case.functional_ops("numba") for layout, case in cases.items()}
    ratios = {}
    for op in ("train_fwd", "fwd_bwd"):
        peers = {k: v[op] for k, v in ops.items()}
        if op == "train_fwd":
            nhwc = cases["NHWC"]
            tx = torch.from_numpy(nhwc.x)
            peers["NHWC read (torch.sum)"] = tx.sum
            peers["NHWC read+write (eval fwd)"] = nhwc.functional_ops("numba", nhwc.out)["eval_fwd"]
            peers["NHWC statistics (bnlab)"] = partial(
                channel_moments, nhwc.x.reshape(nhwc.shape[0], -1, nhwc.c), True
            )
        t = time_interleaved(peers, repeat=repeat, warmup=2)
        ratios[op] = {
            "median": t["NHWC"]["median_ms"] / t["NCHW"]["median_ms"],
            "best": t["NHWC"]["min_ms"] / t["NCHW"]["min_ms"],
            "times": t,
        }
        if op == "train_fwd":
            floor = t["NHWC read (torch.sum)"]["median_ms"]
            floor += t["NHWC read+write (eval fwd)"]["median_ms"]
            ratios[op]["nhwc_floor_ms"] = floor
            ratios[op]["floor_ratio"] = floor / t["NCHW"]["median_ms"]
    return ratios


def check_targets(rows, best: bool = False, ratios: dict | None = None) -> list[dict]:
    """The issue's targets, evaluated on this run's medians (or, with ``best``, on the best round
    of each peer: what the code does when the shared machine lets it run)."""
    key = "min_ms" if best else "median_ms"
    rows = [
        {**r, "speedup": r["speedup_best" if best else "speedup"],
         "pct_limit": r["pct_limit_best" if best else "pct_limit"],
         "speedup_out": r["times"]["torch"][key] / r["times"]["bnlab+out"][key],
         "bnlab_ms": r["times"]["bnlab"][key]}
        for r in rows
    ]  # fmt: skip
    get = {(r["shape"], r["layout"], r["op"]): r for r in rows}
    big, nc = ("64x64x56x56", "NCHW"), ("256x4096", "NC")
    checks = []

    def add(name, value, target, ok):
        checks.append({"target": name, "value": round(value, 3), "goal": target, "met": bool(ok)})

    if (*big, "fwd_bwd") in get:
        fb, tf, ev = get[(*big, "fwd_bwd")], get[(*big, "train_fwd")], get[(*big, "eval_fwd")]
        add("NCHW fwd+bwd speed-up vs PyTorch", fb["speedup"], ">= 2.5", fb["speedup"] >= 2.5)
        add("NCHW train fwd speed-up", tf["speedup"], ">= 2", tf["speedup"] >= 2)
        add(
            "NCHW eval fwd speed-up (reused out)", ev["speedup_out"], ">= 2", ev["speedup_out"] >= 2
        )
        add("NCHW train fwd % of limit", tf["pct_limit"], ">= 60", tf["pct_limit"] >= 60)
        add("NCHW fwd+bwd % of limit", fb["pct_limit"], ">= 60", fb["pct_limit"] >= 60)
        if ratios is not None:
            for op in ("train_fwd", "fwd_bwd"):
                r = ratios[op]["best" if best else "median"]
                add(f"NHWC/NCHW time (interleaved), {op}", r, "<= 1.3", r <= 1.3)
    if (*nc, "fwd_bwd") in get:
        s = get[(*nc, "fwd_bwd")]["speedup"]
        add("(256,4096) fwd+bwd speed-up", s, ">= 1.5", s >= 1.5)
    return checks


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--quick", action="store_true", help="small shapes, few rounds (smoke test)")
    p.add_argument("--repeat", type=int, default=15, help="interleaved rounds per measurement")
    p.add_argument("--numpy-repeat", type=int, default=3, help="rounds for the slow reference")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and numba threads")
    p.add_argument(
        "--name", default=None, type=result_name, help="JSON file name in benchmarks/results/"
    )
    args = p.parse_args(argv)

    import numba
    import torch

    torch.set_num_threads(args.threads)
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    cases = QUICK_CASES if args.quick else FULL_CASES
    repeat = 3 if args.quick else args.repeat
    compile_s = first_call_seconds()
    rows = []
    for shape, layout in cases:
        rows += bench_case(shape, layout, repeat, 2 if args.quick else args.numpy_repeat)
        print(f"done {shape} {layout}", file=sys.stderr, flush=True)
    family = bench_family(FAMILY_QUICK if args.quick else FAMILY_CASES, repeat)
    ratios = None if args.quick else layout_ratio(repeat)
    targets = [] if args.quick else check_targets(rows, ratios=ratios)
    targets_best = [] if args.quick else check_targets(rows, best=True, ratios=ratios)
    print(format_table(rows, TABLE))
    print("\nLayer norm and group norm, forward+backward (same reduction core):\n")
    print(format_table(family, FAMILY_TABLE))
    print("\nbandwidth limit (fastest copy, read+write, median): "
          + ", ".join(f"{r['shape']} {r['limit_gbs']:.1f} GB/s" for r in rows[::3]))  # fmt: skip
    print(
        f"first call of the kernels (compile or cache load, not in the medians): {compile_s:.2f} s"
    )
    print(f"threads: torch {torch.get_num_threads()}, numba {numba.get_num_threads()}; "
          f"load average {os.getloadavg() if hasattr(os, 'getloadavg') else '?'}")  # fmt: skip
    if ratios is not None:
        r = ratios["train_fwd"]
        print(
            f"NHWC training forward floor (a read of x by torch.sum + bnlab's NHWC eval forward): "
            f"{r['nhwc_floor_ms']:.2f} ms = {r['floor_ratio']:.2f}x the NCHW training forward "
            f"({r['times']['NCHW']['median_ms']:.2f} ms); bnlab NHWC: "
            f"{r['times']['NHWC']['median_ms']:.2f} ms, its statistics pass "
            f"{r['times']['NHWC statistics (bnlab)']['median_ms']:.2f} ms against torch.sum's "
            f"{r['times']['NHWC read (torch.sum)']['median_ms']:.2f} ms"
        )
    for t, tb in zip(targets, targets_best, strict=True):
        verdict = "MET" if t["met"] else "NOT met"
        print(
            f"target {t['target']}: median {t['value']} (goal {t['goal']}) {verdict}; "
            f"best round {tb['value']} {'MET' if tb['met'] else 'NOT met'}"
        )
    payload = {
        "command": "python benchmarks/bench_norm.py" + (" --quick" if args.quick else ""),
        "machine": machine_info(),
        "threads": args.threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "malloc_env": malloc_env(),
        "first_call_s": compile_s,
        "machine_caches": _machine(),
        "rows": rows,
        "family": family,
        "nhwc_over_nchw": ratios,
        "targets": targets,
        "targets_best_round": targets_best,
    }
    name = args.name or ("bench_norm_quick" if args.quick else "bench_norm")
    print(f"wrote {write_json(name, payload)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
