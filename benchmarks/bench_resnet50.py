"""ResNet-50 inference, fp32, CPU: bnlab's compiled NHWC engine vs PyTorch eager vs ONNX Runtime.

    python benchmarks/bench_resnet50.py [--batch 1 8] [--threads N] [--repeats 15]

Same thread count for every peer (OpenBLAS for bnlab, torch.set_num_threads, ORT intra-op), set
before numpy is imported. One process, one model (random weights, randomized BN statistics, the
plain-PyTorch ResNet-50 of tests/inference/torch_resnet.py); the ONNX model is exported from it
with ``torch.onnx`` into a temporary folder. Every peer's logits are checked against PyTorch's
before anything is timed. Peers are interleaved in blocks (A..., B..., C..., A..., ...; the first
call of a block untimed, as the previous peer's thread pool may still be spinning) so load changes
on a shared machine hit every peer alike; the medians and the ratios come from the same run.

GFLOP/s: the network's multiply-adds x 2 (convs + fc) over the median latency, next to the
SGEMM peak reached in the same run on large and on ResNet-shaped matrices by ``np.matmul``
(OpenBLAS) and by bnlab's packed GEMM (what the engine calls); "% GEMM peak" uses the best.
Writes benchmarks/results/bench_resnet50.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=15, help="timed calls per peer and batch size")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--size", type=int, default=224, help="image side (default 224)")
    p.add_argument("--profile", action="store_true",
                   help="also print bnlab's ms per layer type (each step timed alone)")  # fmt: skip
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_resnet50.json"))
    return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:  # thread counts must be fixed before numpy/torch load their pools
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)

import numpy as np  # noqa: E402

# --------------------------------------------------------------------------- FLOPs and GEMM peak


def _conv_flops(cv, h: int, w: int) -> tuple[float, int, int]:
    """2·h_out·w_out·C_out·C_in·k² and the output size of one conv on an h x w input."""
    ho = (h + 2 * cv.pad - cv.k) // cv.stride + 1
    wo = (w + 2 * cv.pad - cv.k) // cv.stride + 1
    return 2.0 * ho * wo * cv.c_out * cv.c_in * cv.k**2, ho, wo


def resnet_flops(spec, h: int, w: int) -> float:
    """FLOPs (2 x multiply-adds) of every conv and the fc for one (3, h, w) image."""
    total, h, w = _conv_flops(spec.stem, h, w)
    h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1  # maxpool 3x3, stride 2, padding 1
    for blk in spec.blocks:
        f1, _, _ = _conv_flops(blk.conv1, h, w)
        f2, ho, wo = _conv_flops(blk.conv2, h, w)
        f3, _, _ = _conv_flops(blk.conv3, ho, wo)
        fd = _conv_flops(blk.downsample, h, w)[0] if blk.downsample else 0.0
        total += f1 + f2 + f3 + fd
        h, w = ho, wo
    return total + 2.0 * spec.num_features * spec.num_classes


def gemm_peak(threads: int, repeats: int = 5) -> dict[str, float]:
    """Best GFLOP/s of np.matmul (OpenBLAS) and of bnlab's packed GEMM, float32, on a large square
    and on ResNet-50-shaped products (M = rows of the activation matrix at batch 1)."""
    from bnlab.inference import _act as A
    from bnlab.inference import _gemm as G

    shapes = {"1024^3": (1024, 1024, 1024), "3136x576x64": (3136, 576, 64),
              "784x1152x128": (784, 1152, 128), "49x4608x512": (49, 4608, 512)}  # fmt: skip
    rng = np.random.default_rng(0)
    pool = G.shared_pool(threads)
    IDENTITY = A.as_params(A.IDENTITY)  # noqa: N806
    out = {}
    for name, (m, k, n) in shapes.items():
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        c = np.empty((m, n), np.float32)
        panels, shift, none = G.pack_panels(b), np.zeros(n, np.float32), np.zeros(0, np.float32)
        items = G.work_items(m, n, k, threads)

        def packed(a=a, c=c, panels=panels, shift=shift, none=none, items=items):
            pool.run(
                lambda *it: G.gemm_tile_range(
                    a, panels, c, *it, none, shift, none.reshape(0, 1), *IDENTITY
                ),
                items,
            )

        for label, fn in (("np.matmul", lambda a=a, b=b, c=c: np.matmul(a, b, out=c)),
                          ("bnlab GEMM", packed)):  # fmt: skip
            fn()
            best = min(_timed(fn) for _ in range(repeats))
            out[f"{label} {name}"] = 2 * m * k * n / best / 1e9
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _timed_both(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the whole process) of one call. With one thread the CPU time
    is what the call costs on an idle core, whatever the machine's load."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


# --------------------------------------------------------------------------- peers


def build_peers(threads: int, tmp: Path):
    import torch

    sys.path.insert(0, str(ROOT / "tests" / "inference"))
    from torch_resnet import randomized_resnet50

    import bnlab.inference

    torch.set_num_threads(threads)
    model = randomized_resnet50(seed=0)
    predict = bnlab.inference.compile(model, threads=threads)

    def torch_eager(x):
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()

    peers = {"bnlab compiled": predict, "PyTorch eager": torch_eager}
    try:
        peers["ONNX Runtime"] = _onnx_peer(model, threads, tmp)
    except ImportError as err:
        print(f"ONNX Runtime not available ({err}): pip install onnxruntime onnx")
    return peers


def _onnx_peer(model, threads: int, tmp: Path):
    import onnxruntime as ort
    import torch

    path = tmp / "resnet50.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(1, 3, 224, 224),),
            str(path),
            dynamo=False,
            input_names=["x"],
            output_names=["logits"],
            opset_version=17,
            dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}},
        )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"x": x})[0]


def check_peers(peers, x) -> dict[str, float]:
    """Max |logit difference| / max |logit| of every peer vs PyTorch eager; abort above 1e-3."""
    ref = peers["PyTorch eager"](x)
    errs = {}
    for name, fn in peers.items():
        err = float(np.abs(fn(x) - ref).max() / np.abs(ref).max())
        errs[name] = err
        if err > 1e-3:
            raise SystemExit(f"{name} disagrees with PyTorch: relative error {err:.2e}")
    return errs


def time_interleaved(peers, x, repeats: int, warmup: int, rounds: int = 3) -> dict[str, list]:
    """``rounds`` rounds of (peer A block, peer B block, ...); each block is one untimed call (the
    previous peer's thread pool may still be spinning) and then ~repeats/rounds timed calls."""
    for _ in range(warmup):
        for fn in peers.values():
            fn(x)
    per_block = max(1, -(-repeats // rounds))
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in peers}
    for _ in range(rounds):
        for name, fn in peers.items():
            fn(x)
            times[name] += [_timed_both(lambda fn=fn: fn(x)) for _ in range(per_block)]
    return times


# --------------------------------------------------------------------------- main


def main(args) -> int:
    from bnlab.inference.spec import resnet_spec
    from bnlab.io import atomic_write_json

    peak = gemm_peak(args.threads)
    peak_best = max(peak.values())
    flops_per_image = resnet_flops(resnet_spec(), args.size, args.size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        peers = build_peers(args.threads, Path(tmp))
        rng = np.random.default_rng(0)
        for batch in args.batch:
            x = rng.standard_normal((batch, 3, args.size, args.size), dtype=np.float32)
            errs = check_peers(peers, x)
            if args.profile:
                print_profile(peers["bnlab compiled"], x, batch)
            times = time_interleaved(peers, x, args.repeats, args.warmup)
            med = {n: float(np.median([w for w, _ in t])) for n, t in times.items()}
            cpu = {n: float(np.median([c for _, c in t])) for n, t in times.items()}
            for name in peers:
                gflops = flops_per_image * batch / med[name] / 1e9
                rows.append(
                    {
                        "batch": batch,
                        "peer": name,
                        "median_ms": med[name] * 1e3,
                        "min_ms": min(w for w, _ in times[name]) * 1e3,
                        "cpu_ms": cpu[name] * 1e3,
                        "gflops": gflops,
                        "pct_of_gemm_peak": 100 * gflops / peak_best,
                        "bnlab_speedup": med[name] / med["bnlab compiled"],
                        "max_rel_err_vs_torch": errs[name],
                    }
                )
    again = gemm_peak(args.threads)  # peaks at the start and at the end: the best of both
    peak = {k: max(v, again[k]) for k, v in peak.items()}
    peak_best = max(peak.values())
    for r in rows:
        r["pct_of_gemm_peak"] = 100 * r["gflops"] / peak_best
    print_table(rows, peak, flops_per_image, args)
    result = {
        "threads": args.threads,
        "size": args.size,
        "repeats": args.repeats,
        "gflop_per_image": flops_per_image / 1e9,
        "gemm_peak_gflops": peak,
        "rows": rows,
        "load_average": os.getloadavg(),
        "cpu_count": os.cpu_count(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(f"\nwrote {args.out}")
    return 0


def print_profile(predict, x, batch: int) -> None:
    """bnlab's time per step kind (median of 5 calls, each step timed alone)."""
    prof = predict.profile(x)
    total = sum(prof.values())
    print(f"bnlab profile, batch {batch}: {total:.1f} ms in steps")
    for label, ms in sorted(prof.items(), key=lambda kv: -kv[1]):
        print(f"  {label:<24} {ms:7.2f} ms  {100 * ms / total:4.1f}%")


def print_table(rows, peak, flops_per_image, args) -> None:
    print(
        f"ResNet-50 fp32, {args.size}x{args.size}, {args.threads} threads, median of "
        f"{args.repeats} interleaved calls; {flops_per_image / 1e9:.2f} GFLOP per image"
    )
    print("SGEMM peak GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in peak.items()))
    print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
    print("| batch | peer | median ms | min ms | CPU ms | GFLOP/s | % GEMM peak | time / bnlab |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['batch']} | {r['peer']} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | "
            f"{r['cpu_ms']:.1f} | "
            f"{r['gflops']:.0f} | {r['pct_of_gemm_peak']:.0f}% | {r['bnlab_speedup']:.2f}x |"
        )


if __name__ == "__main__":
    sys.exit(main(ARGS))
