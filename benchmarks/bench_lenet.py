"""LeNet-BN training throughput: bnlab's NumPy/numba engine vs PyTorch, same process, same batches.

    python benchmarks/bench_lenet.py --steps 60 --rounds 5 [--threads 2] [--json out.json]
    python benchmarks/bench_lenet.py --accuracy-epochs 10      # also compare test accuracy

Both engines start from the same weights (bnlab's seeded init loaded into the torch model), see
the same batches (Fashion-MNIST when installed, else seeded random images) and use the same
number of threads: torch.set_num_threads(N) for PyTorch; N numba threads for bnlab, whose
kernels are parallel over the batch, with OpenBLAS kept at 1 thread (LeNet's GEMMs are small:
a threaded OpenBLAS only spins against the numba threads, measured 2-8x slower per step at
2 threads on the shared 2-core machine). Rounds alternate torch / bnlab so that load from other
processes hits both alike; the result is the median examples/s of each and the ratio of the
medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60, help="timed training steps per round")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (JIT, caches)")
    p.add_argument("--rounds", type=int, default=5, help="alternating torch/bnlab rounds")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1.0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="threads of both engines (default 1, as `bnlab train`; 0 = the number of CPUs)",
    )
    p.add_argument(
        "--accuracy-epochs",
        type=int,
        default=0,
        help="also train both for N full epochs and compare test accuracy",
    )
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    for name in ("steps", "rounds", "batch_size"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    if args.warmup < 0 or args.accuracy_epochs < 0 or args.threads < 0:
        p.error("--warmup, --accuracy-epochs and --threads must be >= 0")
    return args


def set_threads_env(threads: int) -> None:
    """Thread pools read these when their library loads: call before importing numpy/torch."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(threads)
    # bnlab sets this default on import (see bnlab/__init__.py); set it before torch loads so
    # both peers run under the same OpenMP wait policy.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def torch_lenet_bn(torch):
    t = torch.nn
    return t.Sequential(
        t.Conv2d(1, 6, 5), t.BatchNorm2d(6), t.Sigmoid(), t.AvgPool2d(2, 2),
        t.Conv2d(6, 16, 5), t.BatchNorm2d(16), t.Sigmoid(), t.AvgPool2d(2, 2), t.Flatten(),
        t.Linear(256, 120), t.BatchNorm1d(120), t.Sigmoid(),
        t.Linear(120, 84), t.BatchNorm1d(84), t.Sigmoid(), t.Linear(84, 10),
    )  # fmt: skip


def load_data(np):
    """(train images, labels, test images, labels, source) — real data when installed."""
    try:
        from bnlab.data import load_fashion_mnist

        tr, te = load_fashion_mnist("train"), load_fashion_mnist("test")
        return (*tr, *te, "fashion-mnist")
    except FileNotFoundError:
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (12_000, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, 12_000).astype(np.uint8)
        return x[:10_000], y[:10_000], x[10_000:], y[10_000:], "random (Fashion-MNIST missing)"


class BnlabRunner:
    def __init__(self, model, lr):
        from bnlab import nn
        from bnlab.optim import SGD

        self.model, self.loss = model, nn.CrossEntropyLoss()
        self.opt = SGD(model.parameters(), lr=lr)
        model[0].input_grad = False  # as bnlab.train does: no dL/dx for the input images

    def step(self, x, y) -> float:
        self.opt.zero_grad()
        loss = self.loss(self.model(x), y)
        self.model.backward(self.loss.backward())
        self.opt.step()
        return loss


class TorchRunner:
    def __init__(self, torch, model, lr):
        self.torch, self.model = torch, model
        self.opt = torch.optim.SGD(model.parameters(), lr=lr)

    def step(self, x, y) -> float:
        self.opt.zero_grad()
        loss = self.torch.nn.functional.cross_entropy(self.model(x), y)
        loss.backward()
        self.opt.step()
        return loss.item()


def timed(runner, batches, warmup: int) -> tuple[float, float]:
    """(examples per wall second, examples per CPU second of this process) over ``batches``
    after ``warmup`` untimed steps. CPU time is what the work costs, whatever other processes
    do; on a loaded machine it is the steadier of the two (with several threads it also counts
    time spent spinning)."""
    for x, y in batches[:warmup]:
        runner.step(x, y)
    start, cpu = time.perf_counter(), time.process_time()
    n = 0
    for x, y in batches[warmup:]:
        runner.step(x, y)
        n += len(y)
    return n / (time.perf_counter() - start), n / (time.process_time() - cpu)


def accuracy_run(np, torch, data, epochs, batch_size, lr):
    """Train fresh copies of both for ``epochs`` epochs on the same batches; test accuracies."""
    from bnlab.data import batches
    from bnlab.models import lenet_bn
    from bnlab.train import evaluate

    model = lenet_bn(0)
    tm = torch_lenet_bn(torch)
    tm.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})
    ours, theirs = BnlabRunner(model, lr), TorchRunner(torch, tm, lr)
    for epoch in range(epochs):
        for x, y in batches(data[0], data[1], batch_size, seed=0, epoch=epoch):
            ours.step(x, y)
            theirs.step(torch.from_numpy(x), torch.from_numpy(y))
    tm.eval()
    correct = 0
    with torch.no_grad():
        for x, y in batches(data[2], data[3], 1000, shuffle=False):
            correct += int((tm(torch.from_numpy(x)).argmax(1).numpy() == y).sum())
    return evaluate(model, data[2], data[3]), correct / len(data[3])


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = args.threads or os.cpu_count() or 1
    set_threads_env(threads)
    import numpy as np
    import torch

    import bnlab
    from bnlab.data import batches
    from bnlab.models import lenet_bn
    from bnlab.nn.threads import set_blas_threads, set_num_threads

    torch.set_num_threads(threads)
    set_num_threads(threads)
    set_blas_threads(1)  # bnlab's threads are the numba kernels' (see the module docstring)
    data = load_data(np)
    n_batches = args.warmup + args.steps
    it = batches(data[0], data[1], args.batch_size, seed=0, epoch=0, drop_last=True)
    np_batches = [b for _, b in zip(range(n_batches), it, strict=False)]
    if len(np_batches) < n_batches:
        sys.exit(f"only {len(np_batches)} batches available, need {n_batches}")
    t_batches = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in np_batches]

    model = lenet_bn(0)
    tm = torch_lenet_bn(torch)
    tm.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})
    ours, theirs = BnlabRunner(model, args.lr), TorchRunner(torch, tm, args.lr)
    # same first step from the same weights: a cheap check that both train the same model
    first = (ours.step(*np_batches[0]), theirs.step(*t_batches[0]))

    rows = []
    for r in range(args.rounds):
        t_rate, t_cpu = timed(theirs, t_batches, args.warmup)
        b_rate, b_cpu = timed(ours, np_batches, args.warmup)
        rows.append(
            {
                "round": r,
                "torch": t_rate,
                "bnlab": b_rate,
                "ratio": b_rate / t_rate,
                "torch_per_cpu_s": t_cpu,
                "bnlab_per_cpu_s": b_cpu,
                "cpu_ratio": b_cpu / t_cpu,
            }
        )
        print(
            f"round {r}: torch {t_rate:8,.0f} ex/s   bnlab {b_rate:8,.0f} ex/s   "
            f"ratio {b_rate / t_rate:.2f}   (per CPU-second: torch {t_cpu:,.0f}, "
            f"bnlab {b_cpu:,.0f}, ratio {b_cpu / t_cpu:.2f})",
            flush=True,
        )
    med_t = statistics.median(r["torch"] for r in rows)
    med_b = statistics.median(r["bnlab"] for r in rows)
    cpu_ratio = statistics.median(r["cpu_ratio"] for r in rows)
    result = {
        "benchmark": "lenet-bn training throughput",
        "data": data[4],
        "batch_size": args.batch_size,
        "steps_per_round": args.steps,
        "rounds": rows,
        "threads": threads,
        "backend": bnlab.get_backend(),
        "torch_version": torch.__version__,
        "first_step_loss": {"bnlab": first[0], "torch": first[1]},
        "median_examples_per_s": {"torch": med_t, "bnlab": med_b},
        "ratio_bnlab_over_torch": med_b / med_t,
        "cpu_time_ratio_bnlab_over_torch": cpu_ratio,
        "load_average": os.getloadavg(),
    }
    print(
        f"median: torch {med_t:,.0f} ex/s, bnlab {med_b:,.0f} ex/s -> "
        f"bnlab/torch = {med_b / med_t:.2f}x; per CPU-second {cpu_ratio:.2f}x  "
        f"({threads} threads, load avg {os.getloadavg()[0]:.1f})"
    )
    if args.accuracy_epochs:
        acc_b, acc_t = accuracy_run(np, torch, data, args.accuracy_epochs, args.batch_size, args.lr)
        result["test_accuracy"] = {"bnlab": acc_b, "torch": acc_t, "epochs": args.accuracy_epochs}
        print(
            f"test accuracy after {args.accuracy_epochs} epochs: bnlab {acc_b:.4f}, "
            f"torch {acc_t:.4f} (difference {100 * (acc_b - acc_t):+.2f} points)"
        )
    if args.json:
        from bnlab.io import atomic_write_json

        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
