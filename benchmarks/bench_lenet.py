"""LeNet-BN training throughput: bnlab's engine vs PyTorch, each in a process of its own.

    python benchmarks/bench_lenet.py                      # both settings below, 5 rounds each
    python benchmarks/bench_lenet.py --rounds 9 --pinned 1 --json benchmarks/results/x.json

Each peer runs the same d2l LeNet-BN training steps (same initial weights, same batches of the real
Fashion-MNIST when installed) in a fresh process, so neither inherits the other's thread pools or
environment. Two settings are reported:

* **as users run them**: PyTorch with its defaults (no environment variable set, its own thread
  count), bnlab as ``bnlab train`` runs by default (numba threads = the cores this process may
  use, OpenBLAS at one thread for LeNet's small GEMMs);
* **pinned**: both at ``--pinned N`` threads (``torch.set_num_threads(N)``; N numba threads).

Rounds alternate the peers (and their order) so that load from other processes hits both alike;
the result is the median examples/s of each and the ratio of the medians. Warm-up steps (numba's
cache load, PyTorch's first allocations) are not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60, help="timed training steps per round")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--rounds", type=int, default=5, help="rounds per setting (peers alternate)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1.0)
    p.add_argument(
        "--pinned", type=int, default=1, help="thread count of the pinned setting (0: skip it)"
    )
    p.add_argument("--json", default="benchmarks/results/bench_lenet.json", help="output file")
    p.add_argument("--worker", choices=["bnlab", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)  # 0: defaults
    args = p.parse_args(argv)
    for name in ("steps", "rounds", "batch_size"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    if args.warmup < 0 or args.pinned < 0:
        p.error("--warmup and --pinned must be >= 0")
    return args


# --------------------------------------------------------------------------- a worker process


def torch_lenet_bn(torch):
    t = torch.nn
    return t.Sequential(
        t.Conv2d(1, 6, 5), t.BatchNorm2d(6), t.Sigmoid(), t.AvgPool2d(2, 2),
        t.Conv2d(6, 16, 5), t.BatchNorm2d(16), t.Sigmoid(), t.AvgPool2d(2, 2), t.Flatten(),
        t.Linear(256, 120), t.BatchNorm1d(120), t.Sigmoid(),
        t.Linear(120, 84), t.BatchNorm1d(84), t.Sigmoid(), t.Linear(84, 10),
    )  # fmt: skip


def training_batches(n: int, batch_size: int):
    """The first n batches of epoch 0 (seeded order), from Fashion-MNIST when installed."""
    import numpy as np

    from bnlab.data import batches

    try:
        from bnlab.data import load_fashion_mnist

        images, labels = load_fashion_mnist("train")
        source = "fashion-mnist"
    except FileNotFoundError:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (n * batch_size, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n * batch_size).astype(np.uint8)
        source = "random (Fashion-MNIST missing)"
    it = batches(images, labels, batch_size, seed=0, epoch=0, drop_last=True)
    return [b for _, b in zip(range(n), it, strict=False)], source


def bnlab_step_fn(threads: int, lr: float):
    """``bnlab train``'s setup: numba threads (default: usable cores), one BLAS thread."""
    from bnlab import nn
    from bnlab.backend import usable_cores
    from bnlab.models import lenet_bn
    from bnlab.nn.threads import set_blas_threads, set_num_threads
    from bnlab.optim import SGD

    set_num_threads(threads or usable_cores())
    set_blas_threads(1)
    model, loss_fn = lenet_bn(0), nn.CrossEntropyLoss()
    model[0].input_grad = False  # as bnlab.train does: no dL/dx for the input images
    opt = SGD(model.parameters(), lr=lr)

    def step(x, y) -> float:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        model.backward(loss_fn.backward())
        opt.step()
        return float(loss)

    return step, (threads or usable_cores())


def torch_step_fn(threads: int, lr: float):
    """d2l's loop in PyTorch: its own defaults unless ``threads`` pins the count."""
    import torch

    from bnlab.models import lenet_bn

    if threads:
        torch.set_num_threads(threads)
    model = torch_lenet_bn(torch)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in lenet_bn(0).state_dict().items()})
    opt = torch.optim.SGD(model.parameters(), lr=lr)

    def step(x, y) -> float:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
        loss.backward()
        opt.step()
        return loss.item()

    return step, torch.get_num_threads()


def worker(args) -> int:
    make = bnlab_step_fn if args.worker == "bnlab" else torch_step_fn
    data, source = training_batches(args.warmup + args.steps, args.batch_size)
    step, threads = make(args.threads, args.lr)
    first = step(*data[0])
    for x, y in data[1 : args.warmup]:
        step(x, y)
    start, cpu = time.perf_counter(), time.process_time()
    n = 0
    for x, y in data[args.warmup :]:
        step(x, y)
        n += len(y)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    result = {"rate": n / wall, "cpu_rate": n / cpu, "first_loss": first, "threads": threads}
    print(json.dumps({**result, "data": source}))
    return 0


# --------------------------------------------------------------------------- the parent


def run_worker(peer: str, threads: int, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", peer, "--threads", str(threads)]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    cmd += ["--batch-size", str(args.batch_size), "--lr", repr(args.lr)]
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}  # each its own default
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        sys.exit(f"{peer} worker failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(setting: str, threads: int, args) -> dict:
    rounds = []
    for r in range(args.rounds):
        order = ("torch", "bnlab") if r % 2 == 0 else ("bnlab", "torch")
        got = {peer: run_worker(peer, threads, args) for peer in order}
        rounds.append(got)
        print(
            f"{setting} round {r}: torch {got['torch']['rate']:8,.0f} ex/s "
            f"({got['torch']['threads']} threads)   bnlab {got['bnlab']['rate']:8,.0f} ex/s "
            f"({got['bnlab']['threads']} threads)   ratio "
            f"{got['bnlab']['rate'] / got['torch']['rate']:.2f}",
            flush=True,
        )
    med = {p: statistics.median(r[p]["rate"] for r in rounds) for p in ("torch", "bnlab")}
    return {
        "setting": setting,
        "threads": {p: rounds[0][p]["threads"] for p in ("torch", "bnlab")},
        "median_examples_per_s": med,
        "ratio_bnlab_over_torch": med["bnlab"] / med["torch"],
        "first_step_loss": {p: rounds[0][p]["first_loss"] for p in ("torch", "bnlab")},
        "data": rounds[0]["bnlab"]["data"],
        "rounds": rounds,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    settings = [("as users run them", 0)]
    if args.pinned:
        settings.append((f"pinned to {args.pinned} thread(s)", args.pinned))
    results = [measure(name, threads, args) for name, threads in settings]
    print("\n| setting | PyTorch ex/s (threads) | bnlab ex/s (threads) | bnlab / PyTorch |")
    print("|---|---:|---:|---:|")
    for res in results:
        med, th = res["median_examples_per_s"], res["threads"]
        print(
            f"| {res['setting']} | {med['torch']:,.0f} ({th['torch']}) | "
            f"{med['bnlab']:,.0f} ({th['bnlab']}) | {res['ratio_bnlab_over_torch']:.2f}x |"
        )
    out = {
        "benchmark": "LeNet-BN training throughput, each peer in its own process",
        "batch_size": args.batch_size,
        "steps_per_round": args.steps,
        "settings": results,
        "load_average": os.getloadavg(),
        "cpus": os.cpu_count(),
    }
    if args.json:
        from bnlab.io import atomic_write_json

        atomic_write_json(args.json, out)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
