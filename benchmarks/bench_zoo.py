"""The CNN zoo, fp32, CPU: bnlab's engine vs ONNX Runtime vs PyTorch eager vs torch.compile.

    python benchmarks/bench_zoo.py [--models resnet18 ...] [--batch 1 8] [--threads 1 2]
                                   [--repeats 7] [--size 224] [--profile] [--name bench_zoo]

For each network (torchvision's definitions, seeded random weights and non-trivial BN statistics,
tests/inference/zoo.py) one ONNX file is exported (opset 17, BN kept as BatchNormalization) and
both bnlab (``bnlab.inference.compile(path)``) and ONNX Runtime (all graph optimizations) run that
same file; PyTorch eager and ``torch.compile`` run the module. Same thread count for every peer
(bnlab's pool, ORT's intra-op threads, torch.set_num_threads). Every peer's output is checked
against PyTorch eager before anything is timed. Peers are interleaved call by call in a shuffled
order (benchmarks/_bench_common.py), so load changes hit every peer alike.

GFLOP/s: 2 x the multiply-adds of every conv and linear layer over the median latency, next to
bnlab's SGEMM peak at that thread count measured in the same run (a 1024^3 product, the best of
a few calls). Writes benchmarks/results/NAME.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests" / "inference"))

from _bench_common import machine_info, result_name, time_interleaved, write_json  # noqa: E402

PEERS = ("bnlab", "ONNX Runtime", "PyTorch eager", "torch.compile")


def parse_args(argv=None):
    from zoo import ZOO

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(ZOO), choices=ZOO)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=7, help="timed calls per peer and row")
    p.add_argument("--size", type=int, default=224, help="image side (default 224)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to build)")
    p.add_argument("--profile", action="store_true", help="print bnlab's ms per step kind")
    p.add_argument("--name", type=result_name, default="bench_zoo", help="results/NAME.json")
    p.add_argument("--quiet-below", type=float, default=None, metavar="LOAD",
                   help="before each network, wait (up to 20 min) until the 1-minute load "
                        "average is below LOAD: the machine is shared")  # fmt: skip
    return p.parse_args(argv)


# --------------------------------------------------------------------------- peak, FLOPs


def gemm_peak(threads: int, size: int = 1024, repeats: int = 5) -> float:
    """bnlab's packed SGEMM on a size^3 product with ``threads`` threads: GFLOP/s, best call."""
    from bnlab.inference import _act as A
    from bnlab.inference import _gemm as G

    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    panels = G.pack_panels(rng.standard_normal((size, size), dtype=np.float32))
    c = np.empty((size, size), np.float32)
    shift, none = np.zeros(size, np.float32), np.zeros(0, np.float32)
    pool, items = G.shared_pool(threads), G.work_items(size, size, size, threads)
    prm = A.as_params(A.IDENTITY)

    def call():
        pool.run(
            lambda *it: G.gemm_tile_range(a, panels, c, *it, none, shift, none.reshape(0, 1), *prm),
            items,
        )

    call()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9


def flops_per_image(graph, size: int) -> float:
    """2 x multiply-adds of the convs and linear layers on a size x size image."""
    from bnlab.inference.graph import infer_shapes

    shapes = infer_shapes(graph, size, size)
    total = 0
    for nd in graph.nodes:
        w = nd.params.get("weight")
        if nd.op == "conv":
            _, ho, wo = shapes[nd.output]
            total += ho * wo * w.size
        elif nd.op == "linear":
            total += w.size
    return 2.0 * total


# --------------------------------------------------------------------------- peers


def make_peers(model, path: Path, threads: int, with_compile: bool) -> tuple[dict, dict]:
    """(name -> predict(x) callable, name -> why it is missing)."""
    import onnxruntime as ort
    import torch

    import bnlab.inference

    torch.set_num_threads(threads)
    peers, missing = {}, {}
    peers["bnlab"] = bnlab.inference.compile(path, threads=threads)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    peers["ONNX Runtime"] = lambda x: session.run(None, {"x": x})[0]

    def eager(x):
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()

    peers["PyTorch eager"] = eager
    if with_compile:
        try:
            # torchvision's ResNets share one forward: without a reset their recompiles add up to
            # dynamo's cache limit and later models silently run eagerly
            torch._dynamo.reset()
            compiled = torch.compile(model)

            def comp(x):
                with torch.no_grad():
                    return compiled(torch.from_numpy(x)).numpy()

            comp(np.zeros((1, *path_shape(path)), np.float32))
            peers["torch.compile"] = comp
        except Exception as err:  # noqa: BLE001 - a peer that does not build here is reported
            missing["torch.compile"] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
    return peers, missing


def path_shape(path: Path) -> tuple[int, int, int]:
    import onnx

    dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type
    return tuple(d.dim_value for d in dims.shape.dim[1:])


def check(peers: dict, x: np.ndarray) -> dict[str, float]:
    """Max |peer − PyTorch eager| / max |PyTorch eager| per peer; refuses a wrong peer."""
    ref = peers["PyTorch eager"](x)
    errs = {}
    for name, fn in peers.items():
        errs[name] = float(np.abs(fn(x) - ref).max() / np.abs(ref).max())
        if errs[name] > 1e-3:
            raise AssertionError(f"{name} disagrees with PyTorch: relative error {errs[name]:.1e}")
    return errs


# --------------------------------------------------------------------------- main


def run_model(name: str, args, peaks: dict, tmp: Path) -> list[dict]:
    from zoo import build, export_onnx

    model = build(name)
    path = tmp / f"{name}.onnx"
    export_onnx(model, path, args.size)
    rows = []
    for threads in args.threads:
        peers, missing = make_peers(model, path, threads, not args.no_compile)
        gflop = flops_per_image(peers["bnlab"].graph, args.size) / 1e9
        for batch in args.batch:
            x = np.random.default_rng(batch).standard_normal((batch, 3, args.size, args.size))
            x = x.astype(np.float32)
            errs = check(peers, x)
            if args.profile:
                print_profile(name, peers["bnlab"], x, threads)
            times = time_interleaved(
                {k: (lambda f=f, x=x: f(x)) for k, f in peers.items()},
                repeat=args.repeats,
                warmup=2,
                gap_s=0.02,  # every peer's idle threads asleep before the next peer runs
            )
            row = {
                "model": name,
                "batch": batch,
                "threads": threads,
                "gflop_per_image": gflop,
                "load": os.getloadavg()[0],
                "missing": missing,
            }
            for peer in PEERS:
                if peer in times:
                    med = times[peer]["median_ms"]
                    row[peer] = {
                        "median_ms": med,
                        "min_ms": times[peer]["min_ms"],
                        "gflops": gflop * batch / med * 1e3,
                        "rel_err": errs[peer],
                    }
            row["pct_of_gemm_peak"] = 100 * row["bnlab"]["gflops"] / peaks[threads]
            rows.append(row)
            print_row(row)
        del peers
    return rows


def print_profile(name, predict, x, threads) -> None:
    prof = predict.profile(x)
    total = sum(prof.values())
    print(f"  bnlab profile {name} batch {len(x)}, {threads} threads: {total:.2f} ms in steps")
    for label, ms in sorted(prof.items(), key=lambda kv: -kv[1])[:12]:
        print(f"    {label:<28} {ms:7.2f} ms  {100 * ms / total:4.1f}%")


HEADER = (
    "| network | batch | threads | bnlab ms | ORT ms | eager ms | compile ms | ORT / bnlab "
    "| eager / bnlab | compile / bnlab | bnlab GFLOP/s | % GEMM peak |"
)


def print_row(r: dict) -> None:
    def ms(peer):
        return f"{r[peer]['median_ms']:.2f}" if peer in r else "-"

    def ratio(peer):
        return f"{r[peer]['median_ms'] / r['bnlab']['median_ms']:.2f}x" if peer in r else "-"

    print(
        f"| {r['model']} | {r['batch']} | {r['threads']} | {ms('bnlab')} | "
        f"{ms('ONNX Runtime')} | {ms('PyTorch eager')} | {ms('torch.compile')} | "
        f"{ratio('ONNX Runtime')} | {ratio('PyTorch eager')} | {ratio('torch.compile')} | "
        f"{r['bnlab']['gflops']:.0f} | {r['pct_of_gemm_peak']:.0f}% |",
        flush=True,
    )


def wait_for_quiet(limit: float, timeout_s: float = 1200) -> None:
    t0 = time.time()
    while os.getloadavg()[0] >= limit and time.time() - t0 < timeout_s:
        time.sleep(10)


def main(args) -> int:
    if args.quiet_below is not None:
        wait_for_quiet(args.quiet_below)
    peaks = {t: gemm_peak(t) for t in args.threads}
    print(
        "bnlab SGEMM peak (1024^3): "
        + ", ".join(f"{t} thread(s) {p:.0f} GFLOP/s" for t, p in peaks.items())
    )
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs\n")
    print(HEADER)
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            if args.quiet_below is not None:
                wait_for_quiet(args.quiet_below)
            rows += run_model(name, args, peaks, Path(tmp))
    again = {t: gemm_peak(t) for t in args.threads}  # the best of the start and the end
    peaks = {t: max(p, again[t]) for t, p in peaks.items()}
    for r in rows:
        r["pct_of_gemm_peak"] = 100 * r["bnlab"]["gflops"] / peaks[r["threads"]]
    print(
        f"\nload average at end: {os.getloadavg()[0]:.2f}; SGEMM peak (best of start and end): "
        + ", ".join(f"{t} thread(s) {p:.0f} GFLOP/s" for t, p in peaks.items())
    )
    payload = {
        "size": args.size,
        "repeats": args.repeats,
        "gemm_peak_gflops": peaks,
        "machine": machine_info(),
        "rows": rows,
    }
    print(f"wrote {write_json(args.name, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
