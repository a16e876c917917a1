"""``bnlab infer``: top-k classes of images with the compiled NHWC engine."""

from __future__ import annotations

HELP = "classify images (.npy or .png) with an ONNX file, a weight file or a training run"


def add_arguments(parser) -> None:
    from bnlab.cli._args import input_file, positive_int
    from bnlab.cli._model import add_model_arguments

    add_model_arguments(parser)
    parser.add_argument(
        "--input",
        required=True,
        type=input_file,
        help="a .npy (float (N,)C,H,W; uint8 H,W,3 or N,H,W) or a .png",
    )
    parser.add_argument(
        "--topk", type=positive_int, default=5, help="how many classes to print (default 5)"
    )
    parser.add_argument(
        "--labels", type=input_file, help="optional text file with one class name per line"
    )
    parser.add_argument("--no-fold", action="store_true", help="keep BN unfolded (for checking)")
    parser.add_argument(
        "--threads", type=positive_int, help="engine threads (default: all allowed CPUs)"
    )


def run(args) -> int:
    from pathlib import Path

    import bnlab.inference
    from bnlab.cli._model import model_argument
    from bnlab.errors import UsageError
    from bnlab.inference.images import read_input, softmax, to_batch, topk

    raw = read_input(args.input)  # the input first: its errors do not depend on the model
    labels = _read_labels(Path(args.labels)) if args.labels else None
    source = model_argument(args, "infer")
    predict = bnlab.inference.compile(source, fold_bn=not args.no_fold, threads=args.threads)
    images = to_batch(raw, predict.in_channels, args.input)
    logits = predict(images)
    if logits.ndim != 2:
        raise UsageError(
            f"{source}: the model's output has shape {logits.shape[1:]} per image, not class scores"
        )
    for i, row in enumerate(topk(softmax(logits), args.topk)):
        if len(images) > 1:
            print(f"image {i}:")
        for rank, (cls, p) in enumerate(row, 1):
            name = labels[cls] if labels and cls < len(labels) else f"class {cls}"
            print(f"{rank:3d}. {name:30s} {p:8.4f}")
    return 0


def _read_labels(path) -> list[str]:
    from bnlab.errors import DataFormatError

    try:
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{path}: --labels must be a UTF-8 text file ({err})") from err
