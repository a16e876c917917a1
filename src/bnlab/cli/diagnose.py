"""``bnlab diagnose --checkpoint PATH``: train/eval mismatch of every batch-norm layer.

Runs the checkpoint's model on real batches (Fashion-MNIST, or any ``--inputs x.npz``), prints a
table per BN layer (mean shift in σ, variance ratio, train-vs-eval difference, batch noise, dead
channels, non-finite running statistics, momentum), a verdict with advice, and optionally writes
JSON and a PNG plot. ``--shift``/``--scale`` transform the inputs (x·scale + shift) to show what a
data shift does. Exit status: 0 (ok or warn), 1 (a layer is bad), 2 (bad arguments or files).
"""

from __future__ import annotations

import argparse
import sys

HELP = "compare batch and running statistics of every BN layer of a checkpoint (train vs eval)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", required=True, help="run folder, checkpoint.safetensors or checkpoint.json"
    )
    p.add_argument("--data", default=None, help="Fashion-MNIST folder (default: the usual places)")
    p.add_argument("--split", choices=("test", "train"), default="test", help="default: test")
    p.add_argument(
        "--inputs", default=None, metavar="X.npz",
        help="use the array 'x' of this .npz (N, 1, 28, 28 or N, 28, 28) instead of Fashion-MNIST",
    )  # fmt: skip
    p.add_argument("--batch-size", type=int, default=256, help="use your training batch size")
    p.add_argument("--batches", type=int, default=20, help="number of batches (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the batch order (default 0)")
    p.add_argument("--shift", type=float, default=0.0, help="add this to every input value")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every input value by this")
    p.add_argument("--json", default=None, metavar="OUT.json", help="write the results as JSON")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="plot the per-layer divergence")


def _error(msg: str) -> int:
    print(f"bnlab diagnose: error: {msg}", file=sys.stderr)
    return 2


def load_model_for_diagnosis(path):
    """The checkpoint's model with its state copied in *as is*.

    ``Module.load_state_dict`` refuses NaN/Inf, but non-finite running statistics are exactly
    what a diagnosis must be able to look at, so keys and shapes are checked here and the arrays
    copied directly.
    """
    import numpy as np

    from bnlab.checkpoint import load_checkpoint
    from bnlab.errors import ShapeError
    from bnlab.models import build_model

    ckpt = load_checkpoint(path)
    model = build_model(ckpt.model_name, seed=0)
    slots = {k: p.data for k, p in model.named_parameters()}
    slots.update(dict(model.named_buffers()))
    state = ckpt.model_state
    missing, unexpected = sorted(set(slots) - set(state)), sorted(set(state) - set(slots))
    if missing or unexpected:
        raise KeyError(
            f"checkpoint does not fit model {ckpt.model_name!r}: missing keys {missing}, "
            f"unexpected keys {unexpected}"
        )
    bad = [
        f"{k}: {state[k].shape} != {a.shape}" for k, a in slots.items() if state[k].shape != a.shape
    ]
    if bad:
        raise ShapeError(f"checkpoint shapes do not fit model {ckpt.model_name!r}: {bad}")
    for k, arr in slots.items():
        np.copyto(arr, state[k], casting="unsafe")
    return model, ckpt


def _inputs(args):
    if args.inputs is not None:
        from bnlab.io import load_npz

        arrays = load_npz(args.inputs)
        if "x" not in arrays:
            raise KeyError(f"{args.inputs} has no array 'x' (found {sorted(arrays)})")
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
    from bnlab.diagnose import diagnose
    from bnlab.errors import DataFormatError

    for name in ("batch_size", "batches"):
        if getattr(args, name) <= 0:
            return _error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    try:
        model, ckpt = load_model_for_diagnosis(args.checkpoint)
        images = _inputs(args)
    except (FileNotFoundError, DataFormatError, KeyError, ValueError) as err:
        return _error(str(err))
    if len(images) < args.batch_size:
        return _error(f"only {len(images)} inputs, fewer than --batch-size {args.batch_size}")
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
    return 1 if result.verdict == "bad" else 0
