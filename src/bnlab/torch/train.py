"""Data-parallel LeNet-BN on Fashion-MNIST with PyTorch on CPU: DDP + bnlab SyncBatchNorm (gloo).

    torchrun --nproc-per-node 2 -m bnlab.torch.train --model lenet-bn --epochs 10 --out runs/ddp
    python -m bnlab.torch.train --model lenet-bn --epochs 10 --out runs/one   # one process
    bnlab.torch.launch.launch(argv, nproc=2)   # the same from Python (bnlab train --engine torch)

Same recipe and outputs as the NumPy engine's ``bnlab train`` (:mod:`bnlab.train`): d2l's LeNet-BN,
SGD on the cross-entropy, batches in the seeded order of :mod:`bnlab.data.batches`; after every
epoch ``metrics.json`` (``{"config", "epochs": [{"epoch", "train_loss", "train_acc", "test_acc",
"examples_per_s", "seconds"}]}``), ``checkpoint.safetensors`` + ``.json`` (:mod:`bnlab.checkpoint`,
atomic; state_dict keys are those of ``bnlab.models.lenet_bn``) and, at the end, ``report.md``.

Data parallelism: ``--batch-size`` is the *global* batch. Every rank draws the same global batch
and keeps its contiguous shard (shards differ by at most one example). Batch norm statistics are
those of the global batch (SyncBatchNorm), and each rank's loss is its *sum* scaled by
world/global_batch, so DDP's gradient average is exactly the gradient of the global mean loss:
two processes train the same model as one process with the same batch size.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bnlab.errors import TrainingDiverged, UsageError
from bnlab.runs import RunFolder, check_mode, data_mismatch
from bnlab.torch.models import lenet_bn
from bnlab.torch.sync import convert_sync_batchnorm
from bnlab.torch.train_checkpoint import NumpyStates, bn_parameters, restore_epoch, save_epoch
from bnlab.train_common import (
    Splits,
    TrainConfig,
    announce_dropped,
    data_record,
    divergence_message,
    epoch_row,
    format_epoch,
    limit_splits,
    load_splits,
    peak_rss_mb,
    short_last_batch,
    weights_finite,
)

MODELS = ("lenet-bn",)


@dataclass(frozen=True)
class Dist:
    """Where this process sits: rank, world size; ``main`` writes the files."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Join the gloo group torchrun describes in the environment (WORLD_SIZE > 1), else solo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return Dist(dist.get_rank(), dist.get_world_size())


def shard(n: int, ctx: Dist) -> slice:
    """This rank's contiguous part of n items (sizes differ by at most one)."""
    base, extra = divmod(n, ctx.world)
    start = ctx.rank * base + min(ctx.rank, extra)
    return slice(start, start + base + (ctx.rank < extra))


def _all_sum(values: list[float], ctx: Dist) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if ctx.world > 1:
        dist.all_reduce(t)
    return t.tolist()


# --------------------------------------------------------------------------- model, steps


def build(config: TrainConfig, ctx: Dist):
    """(model to call, the bare module, optimizer): DDP + SyncBatchNorm when world > 1."""
    if config.model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {config.model!r}")
    module = lenet_bn("bnlab", seed=config.seed)
    if ctx.world > 1:
        module = convert_sync_batchnorm(module)
    opt = torch.optim.SGD(
        module.parameters(), lr=config.lr, momentum=config.momentum,
        weight_decay=config.weight_decay,
    )  # fmt: skip
    return module, opt


def wrap(module: nn.Module, ctx: Dist) -> nn.Module:
    return DistributedDataParallel(module) if ctx.world > 1 else module


def train_step(model, opt, x, y, global_batch: int, ctx: Dist) -> tuple[float, int]:
    """One SGD step on this rank's shard; returns (local loss sum, local correct)."""
    opt.zero_grad(set_to_none=True)
    logits = model(x)
    loss_sum = F.cross_entropy(logits, y, reduction="sum")
    (loss_sum * (ctx.world / global_batch)).backward()  # DDP averages: Σ_r grad / world
    opt.step()
    return float(loss_sum.detach()), int((logits.argmax(1) == y).sum())


def train_epoch(model, opt, splits: Splits, config: TrainConfig, epoch: int, ctx: Dist) -> dict:
    """One epoch on this rank's shards. The loss sums are all-reduced, so every rank sees the
    same non-finite total and stops together (TrainingDiverged) instead of one rank hanging."""
    from bnlab.data import batches

    model.train()
    drop = short_last_batch(len(splits.train_labels), config.batch_size, ctx.world) > 0
    it = batches(
        splits.train_images, splits.train_labels, config.batch_size, seed=config.seed,
        epoch=epoch, drop_last=drop,
    )  # fmt: skip
    loss_sum, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    for xb, yb in it:
        part = shard(len(yb), ctx)
        x, y = torch.from_numpy(xb[part]), torch.from_numpy(yb[part])
        loss, ok = train_step(model, opt, x, y, len(yb), ctx)
        loss_sum, correct, seen = loss_sum + loss, correct + ok, seen + len(y)
    loss_sum, correct, seen = _all_sum([loss_sum, correct, seen], ctx)
    params = (p.detach().numpy() for p in model.parameters())
    if not (math.isfinite(loss_sum) and weights_finite(params)):
        raise TrainingDiverged(divergence_message(config, epoch, "some step"))
    return epoch_row(epoch, loss_sum, correct, seen, time.perf_counter() - start)


@torch.no_grad()
def evaluate(module: nn.Module, images, labels, ctx: Dist, batch_size: int = 1000) -> float:
    """Test accuracy in eval mode (running statistics); each rank scores its shard."""
    from bnlab.data import batches

    part = shard(len(labels), ctx)
    was_training = module.training
    module.eval()
    correct = 0
    for x, y in batches(images[part], labels[part], batch_size, shuffle=False):
        correct += int((module(torch.from_numpy(x)).argmax(1) == torch.from_numpy(y)).sum())
    module.train(was_training)
    correct, total = _all_sum([correct, len(labels[part])], ctx)
    return correct / total


# --------------------------------------------------------------------------- the run


def train(config: TrainConfig, out, *, ctx: Dist | None = None, resume=False, overwrite=False,
          splits=None, data_root=None, log=print, report=True) -> dict:  # fmt: skip
    """Train (or resume) in folder ``out`` on every rank; rank 0 owns the folder (:mod:`bnlab.runs`:
    locked, validated before anything changes, --overwrite acting at the first save) and writes
    the files. Resuming a finished run does nothing. Raises TrainingDiverged on a NaN/Inf loss."""
    config.validate()
    ctx = ctx or init_distributed()
    out = Path(out)
    check_mode(out, resume, overwrite)  # every rank: the same answer before any collective
    if not ctx.main:
        return _train_run(config, out, ctx, None, resume, splits, data_root, log, report)
    with RunFolder.claim(out, resume=resume, overwrite=overwrite) as run:
        return _train_run(config, out, ctx, run, resume, splits, data_root, log, report)


def _train_run(config, out, ctx, run, resume, splits, data_root, log, report) -> dict:
    module, opt = build(config, ctx)
    states = NumpyStates(module, opt)
    cfg = {**asdict(config), "engine": "torch", "world_size": ctx.world}
    metrics = {"config": cfg, "epochs": []}
    start = restore_epoch(out, cfg, states, metrics) if resume else 0
    if start >= config.epochs and resume:
        if ctx.main:
            log(f"nothing to do: {out} already has {start} epochs (--epochs {config.epochs}); "
                "the run is left as it is")  # fmt: skip
        return metrics
    model = wrap(module, ctx)
    splits = limit_splits(splits, config) if splits is not None else load_splits(config, data_root)
    current = data_record(splits, config, ctx.world)
    problem = resume and data_mismatch(out, metrics.get("data"), current)
    if problem:
        raise UsageError(problem)
    metrics["data"] = current
    if ctx.main:
        announce_dropped(metrics["data"], log)
    for epoch in range(start, config.epochs):
        row = train_epoch(model, opt, splits, config, epoch, ctx)
        row["test_acc"] = evaluate(module, splits.test_images, splits.test_labels, ctx)
        metrics["epochs"].append(row)
        metrics["peak_rss_mb"] = peak_rss_mb()  # this process (rank 0 when distributed)
        if ctx.main:
            save_epoch(out, states, cfg, metrics, epoch + 1)
            run.wrote()
            log(format_epoch(row, config.epochs))
    if ctx.main and report:
        from bnlab.report import write_report

        write_report(out, metrics, bn_parameters(module))
        run.wrote()
    if ctx.world > 1:
        dist.barrier()  # nobody tears the group down while rank 0 is still writing
    return metrics


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bnlab.torch.train", description=__doc__.split("\n")[0]
    )
    p.add_argument("--model", choices=MODELS, default="lenet-bn")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=256, help="global batch (all ranks)")
    p.add_argument("--lr", type=float, default=1.0)
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    mode.add_argument("--overwrite", action="store_true", help="delete a previous run's files")
    p.add_argument("--backend", choices=["numba", "numpy"], default=None, help="bnlab kernels")
    p.add_argument("--data", default=None, help="Fashion-MNIST folder (default: bnlab's search)")
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument(
        "--threads", type=int, default=None, help="threads per process (default: cores/processes)"
    )
    return p.parse_args(argv)


def set_threads(threads: int | None, ctx: Dist) -> None:
    """Split the cores between the processes (torch intra-op and numba kernels alike)."""
    from bnlab.backend import usable_cores

    n = threads or max(1, usable_cores() // ctx.world)
    torch.set_num_threads(n)
    try:
        import numba
    except ImportError:
        return
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


def config_of(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        model=args.model, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        seed=args.seed, momentum=args.momentum, weight_decay=args.weight_decay,
        train_limit=args.train_limit, test_limit=args.test_limit, engine="torch",
    )  # fmt: skip


#: Set by :func:`bnlab.torch.launch.launch` for its torchrun workers: the file where each rank
#: leaves its exit status.
STATUS_ENV = "BNLAB_TRAIN_STATUS_FILE"


def main(argv=None) -> int:
    """Run one rank; returns the CLI exit status (0, 1 diverged, 2 bad input, 3 internal). Under
    :func:`bnlab.torch.launch.launch`, the status goes to STATUS_ENV's file and the process
    exits 0, so torchrun
    does not print its own failure report on top of bnlab's one-line error."""
    from bnlab.cli import EXIT_FAILED, EXIT_INTERNAL, EXIT_USAGE, describe, usage_errors

    args = parse_args(argv)
    ctx, code, metrics = Dist(), 0, None
    try:
        config = config_of(args)
        config.validate()
        if args.backend is not None:
            from bnlab.backend import set_backend

            set_backend(args.backend)
        ctx = init_distributed()
        set_threads(args.threads, ctx)
        metrics = train(
            config, args.out, ctx=ctx, resume=args.resume, overwrite=args.overwrite,
            data_root=args.data,
        )  # fmt: skip
    except TrainingDiverged as err:
        code, message = EXIT_FAILED, f"error: {err}"
    except usage_errors() as err:
        code, message = EXIT_USAGE, f"error: {describe(err)}"
    except Exception as err:
        if os.environ.get("BNLAB_DEBUG"):
            raise
        code = EXIT_INTERNAL
        message = f"internal error: {type(err).__name__}: {describe(err)} (a bug in bnlab)"
    finally:
        if dist.is_initialized():
            # free DDP's reducer (held in reference cycles) while its group is still alive, so
            # nothing touches a destroyed group at interpreter exit
            gc.collect()
            dist.destroy_process_group()
    if code and (ctx.main or code == EXIT_INTERNAL):
        print(f"bnlab train: {message}", file=sys.stderr)
    elif ctx.main and metrics and metrics["epochs"]:
        print(f"final test accuracy {metrics['epochs'][-1]['test_acc']:.4f}; outputs in {args.out}")
    return _report_status(code, ctx)


def _report_status(code: int, ctx: Dist) -> int:
    status_file = os.environ.get(STATUS_ENV)
    if not status_file:
        return code
    if ctx.main or code:
        Path(f"{status_file}.{ctx.rank}").write_text(str(code))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
