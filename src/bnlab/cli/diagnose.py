"""``bnlab diagnose --checkpoint PATH``: train/eval mismatch of every batch-norm layer.

Runs the checkpoint's model on real batches (Fashion-MNIST, or any ``--inputs x.npz``), prints a
table per BN layer (mean shift in σ, variance ratio, train-vs-eval difference, batch noise, dead
channels, non-finite running statistics, momentum), a verdict with advice, and optionally writes
JSON and a PNG plot. ``--shift``/``--scale`` transform the inputs (x·scale + shift) to show what a
data shift does. Exit status: 0 (ok or warn), 1 (a layer is bad), 2 (bad arguments or files),
3 (a bug in bnlab).
"""

from __future__ import annotations

import argparse

from bnlab.cli._args import (
    finite_float,
    input_file,
    int_at_least,
    nonneg_int,
    output_file,
    positive_int,
)

HELP = "compare batch and running statistics of every BN layer of a checkpoint (train vs eval)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", required=True, help="run folder, checkpoint.safetensors or checkpoint.json"
    )
    p.add_argument("--data", default=None, help="Fashion-MNIST folder (default: the usual places)")
    p.add_argument("--split", choices=("test", "train"), default="test", help="default: test")
    p.add_argument(
        "--inputs", default=None, metavar="X.npz", type=input_file,
        help="use the array 'x' of this .npz (N, 1, 28, 28 or N, 28, 28) instead of Fashion-MNIST",
    )  # fmt: skip
    p.add_argument(
        "--batch-size",
        type=int_at_least(2),
        default=256,
        help="use your training batch size (at least 2: batch statistics of one sample are "
        "undefined)",
    )
    p.add_argument(
        "--batches", type=positive_int, default=20, help="number of batches (default 20)"
    )
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of the batch order (default 0)")
    p.add_argument("--shift", type=finite_float, default=0.0, help="add this to every input value")
    p.add_argument(
        "--scale", type=finite_float, default=1.0, help="multiply every input value by this"
    )
    p.add_argument(
        "--json",
        default=None,
        metavar="OUT.json",
        type=output_file,
        help="write the results as JSON",
    )
    p.add_argument(
        "--plot", default=None, metavar="OUT.png", type=output_file,
        help="plot the per-layer divergence",
    )  # fmt: skip


def load_model_for_diagnosis(path):
    """The checkpoint's model with its state loaded *as is*: keys, shapes and dtypes are checked,
    but not the values (``Module.load_state_dict`` refuses NaN/Inf and negative variances, which
    are exactly what a diagnosis must be able to look at)."""
    from bnlab.checkpoint import load_checkpoint
    from bnlab.models import build_model

    ckpt = load_checkpoint(path)
    model = build_model(ckpt.model_name, seed=0)
    model.load_state_dict(ckpt.model_state, check_values=False)
    return model, ckpt


def _inputs(args):
    from bnlab.errors import UsageError

    if args.inputs is not None:
        from bnlab.io import load_npz

        arrays = load_npz(args.inputs)
        if "x" not in arrays:
            raise UsageError(f"{args.inputs} has no array 'x' (found {sorted(arrays)})")
        return arrays["x"]
    from bnlab.data import load_fashion_mnist

    return load_fashion_mnist(args.split, args.data)[0]


def _batches(images, args):
    import numpy as np

    from bnlab.data.batches import epoch_order, to_float_images

    order = epoch_order(len(images), args.seed, 0, shuffle=True)
    b = args.batch_size
    for i in range(min(args.batches, len(images) // b)):
        x = to_float_images(np.asarray(images[order[i * b : (i + 1) * b]]))
        yield (x * np.float32(args.scale) + np.float32(args.shift)).astype(np.float32)


def run(args) -> int:
    from bnlab.cli import EXIT_FAILED
    from bnlab.diagnose import diagnose
    from bnlab.errors import UsageError

    model, ckpt = load_model_for_diagnosis(args.checkpoint)
    images = _inputs(args)
    if len(images) < args.batch_size:
        raise UsageError(f"only {len(images)} inputs, fewer than --batch-size {args.batch_size}")
    result = diagnose(model, _batches(images, args))
    print(f"checkpoint: {args.checkpoint} (model {ckpt.model_name}, epoch {ckpt.epoch})")
    if args.shift or args.scale != 1.0:
        print(f"inputs transformed: x * {args.scale:g} + {args.shift:g}")
    print(result.format_table())
    if args.json:
        result.save_json(args.json)
        print(f"wrote {args.json}")
    if args.plot:
        result.plot(args.plot)
        print(f"wrote {args.plot}")
    return EXIT_FAILED if result.verdict == "bad" else 0
