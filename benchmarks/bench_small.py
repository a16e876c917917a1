"""Small inputs: where the kernels stop paying for themselves, and the first call of a process.

    .venv/bin/python benchmarks/bench_small.py            # table, JSON in benchmarks/results/
    .venv/bin/python benchmarks/bench_small.py --quick    # fewer sizes and rounds

For cs231n-sized batches — (4, 5) ... (200, 100) fully connected, (2, 3, 4, 5) ... (50, 64, 16, 16)
spatial — and up, per norm and mode: the NumPy reference (``backend="numpy"``), the kernels
(``backend="numba"``), the default (size-aware: whichever of the two ``bnlab.functional._dispatch``
picks), and a plain NumPy implementation as a student writes it (cs231n's ``batchnorm_forward`` /
``batchnorm_backward_alt``, layer norm and group norm the same way), timed interleaved in one
process (median of the rounds, warm). The *break-even* of a norm and mode is the smallest size
from which the kernels are faster than the reference at every larger size of the sweep:
``BREAK_EVEN`` in ``bnlab/functional/_dispatch.py`` holds these numbers.

First call: a fresh process (warm numba disk cache) importing bnlab and running one forward and
backward, at a cs231n size (the default runs the reference: numba is not even imported) and at a
size that runs the kernels (numba imported, the needed kernels loaded from the disk cache).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_common import format_table, machine_info, result_name, time_interleaved, write_json  # noqa: E402

SIZES = {  # norm -> [(shape, layout)]
    "batch_norm": [
        ((4, 5), "NC"), ((16, 32), "NC"), ((50, 100), "NC"), ((100, 100), "NC"),
        ((200, 100), "NC"), ((256, 512), "NC"), ((1024, 1024), "NC"),
        ((2, 3, 4, 5), "NCHW"), ((8, 8, 8, 8), "NCHW"), ((16, 16, 16, 16), "NCHW"),
        ((50, 64, 16, 16), "NCHW"), ((64, 64, 32, 32), "NCHW"),
    ],
    "layer_norm": [((4, 5), None), ((50, 100), None), ((200, 100), None), ((256, 512), None),
                   ((1024, 1024), None)],
    "group_norm": [((2, 4, 4, 5), None), ((8, 16, 8, 8), None), ((16, 32, 16, 16), None),
                   ((50, 64, 16, 16), None)],
}  # fmt: skip
QUICK = {k: v[::2] for k, v in SIZES.items()}


# --------------------------------------------------------------------------- plain NumPy peers


def plain_bn_train(x, g, b, axes, eps=1e-5):
    mu = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True)
    xhat = (x - mu) / np.sqrt(var + eps)
    return g * xhat + b, (xhat, g, var, eps)


def plain_bn_backward(dout, cache, axes):
    xhat, g, var, eps = cache
    m = dout.size // g.size
    dbeta = dout.sum(axis=axes, keepdims=True)
    dgamma = (dout * xhat).sum(axis=axes, keepdims=True)
    dx = g / np.sqrt(var + eps) / m * (m * dout - dbeta - xhat * dgamma)
    return dx, dgamma, dbeta


def plain_bn_eval(x, g, b, rm, rv, eps=1e-5):
    return g * (x - rm) / np.sqrt(rv + eps) + b


def plain_group(x, g, b, groups, eps=1e-5):
    """Layer norm (groups=None: over the last axis) or group norm, forward and backward."""
    v = x if groups is None else x.reshape(x.shape[0], groups, -1)
    mu = v.mean(axis=-1, keepdims=True)
    var = v.var(axis=-1, keepdims=True)
    xhat = ((v - mu) / np.sqrt(var + eps)).reshape(x.shape)
    y = g * xhat + b
    dy = y  # any upstream gradient: same work
    dxhat = (dy * g).reshape(v.shape)
    xh = xhat.reshape(v.shape)
    dx = dxhat - dxhat.mean(-1, keepdims=True) - xh * (dxhat * xh).mean(-1, keepdims=True)
    dx = dx / np.sqrt(var + eps)
    axes = (0,) if groups is None else (0, 2, 3)
    return dx.reshape(x.shape), (dy * xhat).sum(axis=axes), dy.sum(axis=axes)


# --------------------------------------------------------------------------- cases


def bn_peers(shape, layout, training):
    from bnlab.functional import batch_norm_backward, batch_norm_forward

    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape)
    dy = rng.standard_normal(shape)
    c = shape[1]
    g, b = np.ones(c), np.zeros(c)
    rm, rv = np.zeros(c), np.ones(c)
    axes = (0,) if layout == "NC" else (0, 2, 3)
    pshape = (1, c) if layout == "NC" else (1, c, 1, 1)
    gp, bp, rmp, rvp = (a.reshape(pshape) for a in (g, b, rm, rv))

    def ours(backend):
        def run():
            y, cache = batch_norm_forward(
                x,
                g,
                b,
                training=training,
                running_mean=rm,
                running_var=rv,
                layout=layout,
                backend=backend,
            )
            return batch_norm_backward(dy, cache) if training else y

        return run

    def plain():
        if training:
            _, cache = plain_bn_train(x, gp, bp, axes)
            return plain_bn_backward(dy, cache, axes)
        return plain_bn_eval(x, gp, bp, rmp, rvp)

    return x.size, {"numpy": ours("numpy"), "numba": ours("numba"), "default": ours(None),
                    "plain": plain}  # fmt: skip


def family_peers(norm, shape):
    from bnlab import functional as F

    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape)
    dy = rng.standard_normal(shape)
    if norm == "layer_norm":
        d = shape[-1]
        g, b = np.ones(d), np.zeros(d)

        def ours(backend):
            def run():
                _, cache = F.layer_norm_forward(x, d, g, b, backend=backend)
                return F.layer_norm_backward(dy, cache)

            return run

        groups = None
    else:
        c = shape[1]
        groups = max(1, c // 4)
        g, b = np.ones(c), np.zeros(c)

        def ours(backend):
            def run():
                _, cache = F.group_norm_forward(x, groups, g, b, backend=backend)
                return F.group_norm_backward(dy, cache)

            return run

    gp = g if norm == "layer_norm" else g.reshape(1, -1, 1, 1)
    bp = b if norm == "layer_norm" else b.reshape(1, -1, 1, 1)
    return x.size, {"numpy": ours("numpy"), "numba": ours("numba"), "default": ours(None),
                    "plain": lambda: plain_group(x, gp, bp, groups)}  # fmt: skip


def rounds_for(size: int, quick: bool) -> int:
    base = 40 if size < 100_000 else 10
    return max(3, base // 4) if quick else base


def sweep(quick: bool) -> list[dict]:
    rows = []
    for norm, cases in (QUICK if quick else SIZES).items():
        modes = ("train", "eval") if norm == "batch_norm" else ("train",)
        for mode in modes:
            for shape, layout in cases:
                if norm == "batch_norm":
                    size, peers = bn_peers(shape, layout, mode == "train")
                else:
                    size, peers = family_peers(norm, shape)
                t = time_interleaved(peers, repeat=rounds_for(size, quick), warmup=3)
                med = {k: v["median_ms"] * 1e3 for k, v in t.items()}
                rows.append({
                    "norm": norm, "mode": mode, "shape": "x".join(map(str, shape)),
                    "layout": layout or "-", "values": size,
                    "numpy_us": med["numpy"], "numba_us": med["numba"],
                    "default_us": med["default"], "plain_us": med["plain"],
                    "default_vs_plain": med["default"] / med["plain"],
                    "default_vs_best": med["default"] / min(med["numpy"], med["numba"]),
                })  # fmt: skip
                print(f"done {norm} {mode} {shape}", file=sys.stderr, flush=True)
    return rows


def break_even(rows: list[dict]) -> dict:
    """Per (norm, mode): the smallest size from which the kernels beat the reference at every
    larger size of the sweep (None if they never do)."""
    found = {}
    for key in sorted({(r["norm"], r["mode"]) for r in rows}):
        sized = sorted(
            (r for r in rows if (r["norm"], r["mode"]) == key), key=lambda r: r["values"]
        )
        value = None
        for r in reversed(sized):
            if r["numba_us"] < r["numpy_us"]:
                value = r["values"]
            else:
                break
        found[f"{key[0]}/{key[1]}"] = value
    return found


FIRST_CALL = """
import time, sys
t0 = time.perf_counter()
import numpy as np
from bnlab.functional import batch_norm_backward, batch_norm_forward
shape = {shape!r}
x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
c = shape[1]
y, cache = batch_norm_forward(x, np.ones(c, np.float32), np.zeros(c, np.float32), training=True,
                              layout="NC" if len(shape) == 2 else "NCHW")
batch_norm_backward(x, cache)
print(time.perf_counter() - t0, "numba" in sys.modules)
"""


def first_call(shape, repeat: int = 3) -> dict:
    """Seconds from a fresh interpreter to the end of the first forward+backward (import
    included), best and median of ``repeat`` processes; whether numba was imported."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    code = FIRST_CALL.format(shape=tuple(shape))
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)  # warm
    times, numba = [], None
    for _ in range(repeat):
        out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                             capture_output=True, text=True).stdout.split()  # fmt: skip
        times.append(float(out[0]))
        numba = out[1] == "True"
    return {"shape": list(shape), "best_s": min(times), "median_s": sorted(times)[len(times) // 2],
            "numba_imported": numba}  # fmt: skip


TABLE = [
    ("norm", "norm", ""), ("mode", "mode", ""), ("shape", "shape", ""), ("layout", "layout", ""),
    ("values", "values", ""), ("plain_us", "plain NumPy µs", ".1f"),
    ("numpy_us", "reference µs", ".1f"), ("numba_us", "kernels µs", ".1f"),
    ("default_us", "default µs", ".1f"), ("default_vs_plain", "default / plain", ".2f"),
    ("default_vs_best", "default / best of two", ".2f"),
]  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="every other size, fewer rounds")
    p.add_argument("--name", type=result_name, default=None, help="JSON name in results/")
    args = p.parse_args(argv)
    rows = sweep(args.quick)
    even = break_even(rows)
    calls = [first_call((200, 100)), first_call((64, 64, 28, 28))]
    print(format_table(rows, TABLE))
    print("\nbreak-even (values of x from which the kernels are faster):")
    for key, value in even.items():
        print(f"  {key}: {value}")
    from bnlab.functional._dispatch import BREAK_EVEN

    in_use = {"/".join(k): v for k, v in BREAK_EVEN.items()}
    print(f"in use (_dispatch.BREAK_EVEN): {json.dumps(in_use)}")
    for c in calls:
        print(f"first call, fresh process, shape {tuple(c['shape'])}: best {c['best_s']:.3f} s, "
              f"median {c['median_s']:.3f} s, numba imported: {c['numba_imported']}")  # fmt: skip
    print(f"load average {os.getloadavg()}")
    payload = {"command": "python benchmarks/bench_small.py" + (" --quick" if args.quick else ""),
               "machine": machine_info(), "rows": rows, "break_even": even,
               "break_even_in_use": {"/".join(k): v for k, v in BREAK_EVEN.items()},
               "first_call": calls}  # fmt: skip
    name = args.name or ("bench_small_quick" if args.quick else "bench_small")
    print(f"wrote {write_json(name, payload)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
