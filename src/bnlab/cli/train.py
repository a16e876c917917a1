"""``bnlab train``: train LeNet or LeNet-BN on Fashion-MNIST with bnlab's own engine, or with
PyTorch (``--engine torch``: :mod:`bnlab.torch.train`, DDP + SyncBatchNorm over ``--nproc`` local
CPU processes started by torchrun's machinery). Both engines write the same run folder:
``metrics.json``, ``checkpoint.safetensors`` + ``.json`` and ``report.md``."""

from __future__ import annotations

import argparse
import sys

from bnlab.backend import usable_cores
from bnlab.cli._args import nonneg_float, nonneg_int, positive_float, positive_int

HELP = "train LeNet / LeNet-BN on Fashion-MNIST (metrics.json, checkpoints, report.md)"
TORCH_MODELS = ("lenet-bn",)  # what bnlab.torch.train builds


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=["lenet-bn", "lenet"], default="lenet-bn")
    p.add_argument("--epochs", type=nonneg_int, default=10)
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--lr", type=positive_float, default=1.0)
    p.add_argument("--momentum", type=nonneg_float, default=0.0)
    p.add_argument("--weight-decay", type=nonneg_float, default=0.0)
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--out", required=True, help="run folder (metrics.json, checkpoint, report.md)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    mode.add_argument(
        "--overwrite",
        action="store_true",
        help="start again in an --out that holds a previous run (its run files are deleted)",
    )
    p.add_argument(
        "--data",
        default=None,
        help="Fashion-MNIST folder (default: $BNLAB_DATA, "
        "./data, /usr/share/datasets/fashion-mnist)",
    )
    p.add_argument(
        "--train-limit",
        type=positive_int,
        default=None,
        help="use only the first N training images (quick runs)",
    )
    p.add_argument("--test-limit", type=positive_int, default=None)
    p.add_argument(
        "--backend",
        choices=["numba", "numpy"],
        default=None,
        help="kernels for BN and the engine (default: numba when installed)",
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="threads per process: numba's for bnlab's kernels (numpy engine; its small GEMMs "
        "keep one BLAS thread) or PyTorch's (torch engine). Default: the cores this process may "
        f"use ({usable_cores()} here), divided by --nproc",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument(
        "--engine",
        choices=["numpy", "torch"],
        default="numpy",
        help="numpy: bnlab's own layers (default); torch: PyTorch with bnlab's BatchNorm "
        "(needs pip install bnlab[torch])",
    )
    p.add_argument(
        "--nproc",
        type=positive_int,
        default=1,
        help="data-parallel CPU processes (torch engine: DDP + SyncBatchNorm, --batch-size is the "
        "global batch; --threads is per process)",
    )


def _error(message: str) -> int:
    print(f"bnlab train: error: {message}", file=sys.stderr)
    return 2


def engine_problem(args) -> str | None:
    """Why these arguments cannot run on the chosen engine, or None."""
    if args.threads is not None and args.threads * args.nproc > usable_cores():
        return (
            f"--threads {args.threads} x --nproc {args.nproc} is more than the {usable_cores()} "
            "cores this process may use"
        )
    if args.engine == "numpy":
        if args.nproc > 1:
            return f"--nproc {args.nproc} needs --engine torch (the NumPy engine is one process)"
        return None
    if args.model not in TORCH_MODELS:
        return f"--engine torch trains {' or '.join(TORCH_MODELS)}, got --model {args.model}"
    try:
        import torch  # noqa: F401
    except ImportError:
        return "--engine torch needs PyTorch, which is not installed: pip install bnlab[torch]"
    return None


def torch_argv(args) -> list[str]:
    """The ``python -m bnlab.torch.train`` arguments of the same run (every flag passes through;
    --no-progress has no counterpart: the torch engine prints one line per epoch)."""
    argv = ["--model", args.model, "--epochs", str(args.epochs)]
    argv += ["--batch-size", str(args.batch_size), "--lr", repr(args.lr)]
    argv += ["--momentum", repr(args.momentum), "--weight-decay", repr(args.weight_decay)]
    argv += ["--seed", str(args.seed), "--out", str(args.out)]
    optional = {"--data": args.data, "--train-limit": args.train_limit, "--threads": args.threads}
    optional |= {"--test-limit": args.test_limit, "--backend": args.backend}
    argv += [a for flag, v in optional.items() if v is not None for a in (flag, str(v))]
    argv += [flag for flag in ("--resume", "--overwrite") if getattr(args, flag[2:])]
    return argv


def run(args) -> int:
    problem = engine_problem(args)
    if problem:
        return _error(problem)
    if args.engine == "torch":
        from bnlab.torch.launch import launch

        return launch(torch_argv(args), args.nproc)
    return _run_numpy(args)


def _run_numpy(args) -> int:
    from bnlab.backend import set_backend
    from bnlab.cli import EXIT_FAILED
    from bnlab.errors import TrainingDiverged
    from bnlab.train import TrainConfig, train

    if args.backend is not None:
        set_backend(args.backend)
    from bnlab.nn.threads import set_blas_threads, set_num_threads

    set_num_threads(args.threads or usable_cores())
    # The engine's threads are numba's (batch-parallel kernels); LeNet's GEMMs are too small to
    # thread, and a threaded OpenBLAS spins against numba's threads (8x slower at 2 threads).
    set_blas_threads(1)
    config = TrainConfig(
        model=args.model,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        train_limit=args.train_limit,
        test_limit=args.test_limit,
    )
    try:
        metrics = train(
            config,
            args.out,
            resume=args.resume,
            overwrite=args.overwrite,
            data_root=args.data,
            progress=False if args.no_progress else None,
        )
    except TrainingDiverged as err:
        print(f"bnlab train: error: {err}", file=sys.stderr)
        return EXIT_FAILED
    if metrics["epochs"]:
        print(
            f"final test accuracy {metrics['epochs'][-1]['test_acc']:.4f}; "
            f"report: {args.out}/report.md"
        )
    return 0
