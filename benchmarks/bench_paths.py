"""What each kernel variant earns: the path the plan picks against the one it would take without
that variant, at the shapes of bench_norm, timed interleaved in one process.

    .venv/bin/python benchmarks/bench_paths.py           # table, JSON in benchmarks/results/

Each row switches one variant off through ``bnlab.kernels.paths.limits`` (the plan then takes the
next path, which computes the same values) and times training forward and forward+backward of
the public API (``backend="numba"``, outputs from bnlab.buffers) both ways, round by round in a
random order (medians). "gain" = time without / time with the variant.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_common import format_table, machine_info, result_name, time_interleaved, write_json  # noqa: E402

VARIANTS = [  # (variant, shape, layout, limits that switch it off)
    ("cf-single-launch", (64, 64, 56, 56), "NCHW", {"channel_bytes": 0}),
    ("cl-single-launch", (256, 4096), "NC", {"tile_bytes": 0}),
    ("cl-single-launch", (8, 7, 7, 2048), "NHWC", {"tile_bytes": 0}),
    ("register lanes", (64, 56, 56, 64), "NHWC", {"register_widths": ()}),
    ("streaming stores", (64, 64, 56, 56), "NCHW", {"stream_bytes": 1 << 62}),
    ("streaming stores", (64, 56, 56, 64), "NHWC", {"stream_bytes": 1 << 62}),
    ("short rows column-wise", (8, 2048, 7, 7), "NCHW", {"short_row": 0}),
    ("short rows column-wise", (32, 256, 14, 14), "NCHW", {"short_row": 0}),
]


def ops(shape, layout, limits):
    """Training forward and forward+backward, planned under ``limits`` (None: as shipped)."""
    from bnlab.functional import batch_norm_backward, batch_norm_forward
    from bnlab.kernels import paths

    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    c = shape[-1] if layout in ("NHWC", "NC") else shape[1]
    g, b = np.ones(c, np.float32), np.zeros(c, np.float32)

    def with_limits(fn):
        def run():
            with paths.limits(**(limits or {})):
                return fn()

        return run

    def fwd():
        return batch_norm_forward(x, g, b, training=True, layout=layout, backend="numba")

    def fwd_bwd():
        _, cache = fwd()
        return batch_norm_backward(dy, cache)

    return x, {"train_fwd": with_limits(fwd), "fwd_bwd": with_limits(fwd_bwd)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=15, help="interleaved rounds (x10 under 16 MB)")
    p.add_argument("--name", type=result_name, default="bench_paths")
    args = p.parse_args(argv)
    from bnlab.kernels import explain, paths

    rows = []
    for variant, shape, layout, off in VARIANTS:
        x, with_ = ops(shape, layout, None)
        _, without = ops(shape, layout, off)
        on_plan = explain(x, layout, backend="numba").plan
        with paths.limits(**off):
            off_plan = explain(x, layout, backend="numba").plan
        repeat = args.repeat if x.nbytes >= 16 << 20 else 10 * args.repeat
        for op in ("train_fwd", "fwd_bwd"):
            t = time_interleaved({"with": with_[op], "without": without[op]}, repeat, warmup=2)
            rows.append({
                "variant": variant, "shape": "x".join(map(str, shape)), "layout": layout,
                "op": op, "with_ms": t["with"]["median_ms"],
                "without_ms": t["without"]["median_ms"],
                "gain": t["without"]["median_ms"] / t["with"]["median_ms"],
                "path_with": f"{on_plan.path} {on_plan.chunks}",
                "path_without": f"{off_plan.path} {off_plan.chunks}", "times": t,
            })  # fmt: skip
        print(f"done {variant} {shape}", file=sys.stderr, flush=True)
    columns = [("variant", "variant", ""), ("shape", "shape", ""), ("layout", "layout", ""),
               ("op", "op", ""), ("with_ms", "with ms", ".3f"), ("without_ms", "without ms", ".3f"),
               ("gain", "gain", ".2f")]  # fmt: skip
    print(format_table(rows, columns))
    print(f"load average {os.getloadavg()}")
    payload = {"command": "python benchmarks/bench_paths.py", "machine": machine_info(),
               "rows": rows}  # fmt: skip
    print(f"wrote {write_json(args.name, payload)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
