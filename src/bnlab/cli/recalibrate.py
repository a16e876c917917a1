"""``bnlab recalibrate --checkpoint RUN --out RUN2``: population statistics for a trained run.

The fix ``bnlab diagnose`` recommends when the moving averages lag behind the weights: one pass
over training batches in training mode recomputes every BN layer's running mean and variance
(:func:`bnlab.recalibrate.recalibrate`), and the result is written as a new run folder that
``evaluate``, ``diagnose``, ``fold`` and ``infer`` accept. The original run is never modified.
"""

from __future__ import annotations

import argparse

HELP = (
    "recompute every BN layer's running statistics of a run (population statistics) into a new run"
)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", required=True, help="run folder, checkpoint.safetensors or checkpoint.json"
    )
    p.add_argument("--out", required=True, help="new run folder for the recalibrated model")
    p.add_argument("--data", default=None, help="Fashion-MNIST folder (default: the usual places)")
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        help="batch size of the pass (default: the run's training batch size)",
    )
    p.add_argument(
        "--batches", type=_positive_int, default=None, help="use only the first N batches"
    )
    p.add_argument(
        "--method",
        choices=("population", "precise"),
        default="population",
        help="population: mean of batch means, unbiased mean of batch variances (the BN paper); "
        "precise: the exact statistics of every value seen",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")


def run(args) -> int:
    from pathlib import Path

    from bnlab.checkpoint import existing_paths
    from bnlab.errors import UsageError
    from bnlab.recalibrate import recalibrate_run

    source, _ = existing_paths(args.checkpoint)
    out = Path(args.out)
    if out.exists() and out.resolve() in (source.parent.resolve(), source.resolve()):
        raise UsageError("--out must differ from --checkpoint (the original run is never changed)")
    result = recalibrate_run(
        args.checkpoint,
        out,
        data_root=args.data,
        batch_size=args.batch_size,
        max_batches=args.batches,
        method=args.method,
        overwrite=args.overwrite,
    )
    print(
        f"recalibrated {len(result['layers'])} BN layers from {result['batches']} batches of "
        f"{result['batch_size']} ({result['method']} statistics); test accuracy "
        f"{result['test_acc_before']:.4f} -> {result['test_acc_after']:.4f}; wrote {out}"
    )
    return 0
