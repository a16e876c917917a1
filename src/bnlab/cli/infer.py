"""``bnlab infer``: top-k classes of an image with the compiled ResNet engine."""

from __future__ import annotations

HELP = "classify images (.npy or .png) with a ResNet-50 weight file on the fast NHWC engine"


def add_arguments(parser) -> None:
    parser.add_argument(
        "--weights", required=True, help="ResNet-50 weights: .safetensors, .npz or .pt"
    )
    parser.add_argument(
        "--input", required=True, help="a .npy (float (N,)3,H,W or uint8 H,W,3) or a .png"
    )
    parser.add_argument("--topk", type=int, default=5, help="how many classes to print (default 5)")
    parser.add_argument("--labels", help="optional text file with one class name per line")
    parser.add_argument("--no-fold", action="store_true", help="keep BN unfolded (for checking)")


def run(args) -> int:
    import sys
    from pathlib import Path

    from bnlab.errors import DataFormatError

    if args.topk < 1:
        print(f"bnlab infer: error: --topk must be >= 1, got {args.topk}", file=sys.stderr)
        return 2
    try:
        import bnlab.inference
        from bnlab.inference.images import load_images, softmax, topk

        labels = _read_labels(Path(args.labels)) if args.labels else None
        images = load_images(args.input)
        predict = bnlab.inference.compile(Path(args.weights), fold_bn=not args.no_fold)
        probs = softmax(predict(images))
    except (FileNotFoundError, DataFormatError, KeyError, ValueError, TypeError) as err:
        print(f"bnlab infer: error: {err}", file=sys.stderr)
        return 2
    for i, row in enumerate(topk(probs, args.topk)):
        if len(images) > 1:
            print(f"image {i}:")
        for rank, (cls, p) in enumerate(row, 1):
            name = labels[cls] if labels and cls < len(labels) else f"class {cls}"
            print(f"{rank:3d}. {name:30s} {p:8.4f}")
    return 0


def _read_labels(path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
