"""``bnlab evaluate``: test accuracy of a checkpoint written by ``bnlab train``."""

from __future__ import annotations

import argparse

from bnlab.cli._args import positive_int

HELP = "print the Fashion-MNIST test accuracy of a bnlab checkpoint"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", required=True, help="run folder, checkpoint.safetensors or checkpoint.json"
    )
    p.add_argument("--data", default=None, help="Fashion-MNIST folder")
    p.add_argument("--batch-size", type=positive_int, default=1000)


def run(args) -> int:
    from bnlab.checkpoint import load_checkpoint
    from bnlab.data import load_fashion_mnist
    from bnlab.models import build_model
    from bnlab.train import evaluate

    ckpt = load_checkpoint(args.checkpoint)
    model = build_model(ckpt.model_name, seed=0)
    model.load_state_dict(ckpt.model_state)
    images, labels = load_fashion_mnist("test", args.data)
    acc = evaluate(model, images, labels, args.batch_size)
    print(f"test accuracy {acc:.4f} ({ckpt.model_name}, epoch {ckpt.epoch}, {len(labels)} images)")
    return 0
