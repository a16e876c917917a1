"""bnlab where its first users are: cs231n's notebook checks and d2l's LeNet-BN chapter run.

    python benchmarks/bench_clients.py                       # both parts, recipe 0.17
    python benchmarks/bench_clients.py --part d2l --recipe 1.0 --name bench_clients_d2l_1_0

cs231n: every normalization check of BatchNormalization.ipynb / ConvolutionalNetworks.ipynb
(2021) with the notebooks' seeds and sizes, run on :mod:`bnlab.functional.cs231n` (the harness in
tests/clients); the value next to the notebook's stated tolerance and the bound tests/clients
asserts. d2l: LeNet-BN for ``--epochs`` epochs on real Fashion-MNIST with each batch norm — the
chapter's own class and function, the chapter's class with bnlab's ``batch_norm`` imported in
its place, ``bnlab.torch.BatchNorm`` and ``nn.BatchNorm2d/1d`` — from the same weights on the same
batches, trained in lockstep (each step runs every model, the order rotating, so load from other
processes hits all alike): test accuracy on the 10k test images and the median time per step.
Recipes: ``0.17`` (the older text: momentum 0.9, lr 1.0, batches of 256) and ``1.0`` (momentum
0.1, lr 0.1, batches of 128). Writes benchmarks/results/bench_clients.json (``--name``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "tests" / "clients"))  # the notebook and chapter harness

from _bench_common import format_table, machine_info, result_name, write_json  # noqa: E402

RECIPES = {
    "0.17": {"momentum": 0.9, "lr": 1.0, "batch_size": 256, "convention": "d2l-0.17"},
    "1.0": {"momentum": 0.1, "lr": 0.1, "batch_size": 128, "convention": "d2l-1.0"},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("all", "cs231n", "d2l"), default="all")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="0.17")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train", type=int, default=60000, help="training images (<= 60000)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--name", type=result_name, default="bench_clients")
    args = p.parse_args(argv)
    if not 0 < args.train <= 60000 or args.epochs <= 0 or args.threads <= 0:
        p.error("--train must be in 1..60000, --epochs and --threads > 0")
    return args


def cs231n_part() -> list[dict]:
    import cs231n_cells

    from bnlab.functional import cs231n

    rows = []
    for cell in cs231n_cells.CELLS:
        for r in cell(cs231n):
            rows.append(
                {
                    "cell": r.cell,
                    "check": r.check,
                    "value": r.value,
                    "stated": r.stated,
                    "bound": r.tolerance,
                    "ok": "yes" if r.ok else "NO",
                }
            )
    cols = [
        ("cell", "notebook [cell]", ""),
        ("check", "check", ""),
        ("value", "bnlab", ".3g"),
        ("stated", "notebook says", ""),
        ("bound", "asserted ≤", ".2g"),
        ("ok", "ok", ""),
    ]
    print(format_table(rows, cols))
    return rows


def d2l_part(args) -> list[dict]:
    import d2l_chapter as ch
    import torch
    from torch import nn

    import bnlab.torch as bt
    from bnlab.torch import d2l

    torch.set_num_threads(args.threads)
    recipe = RECIPES[args.recipe]
    chapter_fn = ch.d2l_batch_norm_v017 if args.recipe == "0.17" else ch.d2l_batch_norm_v1
    bnlab_fn = d2l.batch_norm if args.recipe == "0.17" else d2l.batch_norm_v1

    def chapter(fn):
        cls = ch.chapter_batchnorm(fn, recipe["momentum"])
        return ch.lenet_bn(lambda c: cls(c, 4), lambda c: cls(c, 2))

    def module(c, dims):
        return bt.BatchNorm(c, dims, convention=recipe["convention"])

    reference = chapter(chapter_fn)
    nets = {
        "d2l chapter (its own batch_norm)": reference,
        "chapter class + bnlab batch_norm": chapter(bnlab_fn),
        "bnlab.torch.BatchNorm": ch.lenet_bn(lambda c: module(c, 4), lambda c: module(c, 2)),
        "nn.BatchNorm2d/1d": ch.lenet_bn(nn.BatchNorm2d, nn.BatchNorm1d),
    }
    for net in nets.values():
        ch.copy_weights(net, reference)
    train, test = ch.fashion_mnist_subset(args.train, 10000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", d2l.GradModeWarning)  # the chapter's call, on purpose
        result = ch.train_lockstep(
            nets, train, test, epochs=args.epochs, lr=recipe["lr"], batch_size=recipe["batch_size"]
        )
    base = statistics.median(result["d2l chapter (its own batch_norm)"]["step_seconds"])
    rows = []
    for name, r in result.items():
        step = statistics.median(r["step_seconds"])
        rows.append(
            {
                "variant": name,
                "test_accuracy": r["test_accuracy"],
                "final_loss": r["losses"][-1],
                "step_ms": step * 1e3,
                "vs_chapter": step / base,
                "steps": len(r["losses"]),
            }
        )
    cols = [
        ("variant", "batch norm", ""),
        ("test_accuracy", "test acc", ".4f"),
        ("final_loss", "last loss", ".4f"),
        ("step_ms", "ms/step (median)", ".2f"),
        ("vs_chapter", "time vs chapter", ".2f"),
        ("steps", "steps", "d"),
    ]
    print(
        f"\nd2l LeNet-BN, recipe {args.recipe} {recipe}, {args.epochs} epochs on {args.train} "
        f"training images, {args.threads} torch thread(s); accuracy on the 10000 test images"
    )
    print(format_table(rows, cols))
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    payload = {"machine": machine_info(), "args": vars(args)}
    if args.part in ("all", "cs231n"):
        payload["cs231n"] = cs231n_part()
    if args.part in ("all", "d2l"):
        payload["d2l"] = d2l_part(args)
    payload["machine_after"] = machine_info()["loadavg_1_5_15"]
    print(f"\nwrote {write_json(args.name, payload)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
