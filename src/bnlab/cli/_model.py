"""The model argument of ``bnlab infer`` and ``bnlab fold``: positional MODEL or --weights."""

from __future__ import annotations


def add_model_arguments(parser) -> None:
    """Add the positional MODEL and its synonym ``--weights`` to ``parser``."""
    parser.add_argument(
        "model",
        nargs="?",
        help="an .onnx file, a training run folder (or its checkpoint), or a weight file "
        "(.safetensors/.npz/.pt) of a bottleneck ResNet or LeNet(-BN)",
    )
    parser.add_argument("--weights", help="the same as the positional MODEL")


def model_argument(args, command: str):
    """The model path of ``bnlab infer``/``bnlab fold``: positional or --weights, not both; an
    existing file or folder (not a FIFO or a device)."""
    from argparse import ArgumentTypeError

    from bnlab.cli._args import input_path
    from bnlab.errors import UsageError

    if args.model and args.weights and args.model != args.weights:
        raise UsageError(f"give the model once: {args.model!r} and --weights {args.weights!r}")
    source = args.model or args.weights
    if not source:
        raise UsageError(
            f"bnlab {command} needs a model: an .onnx file, a run folder or a weight file"
        )
    try:  # checked after the images, whose errors do not depend on the model
        return input_path(str(source))
    except ArgumentTypeError as err:
        raise UsageError(str(err)) from None
