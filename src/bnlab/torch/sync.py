"""Synchronized batch norm over a ``torch.distributed`` process group (gloo on CPU works).

Each process holds a shard of the global batch. The statistics are those of the *concatenated*
batch, whatever the shard sizes (a shard of one sample, or none, included):

1. shapes first: every rank all-gathers (C, ndim, local-error flag), so a channel mismatch or a
   bad input on one rank raises on *every* rank instead of leaving the others waiting forever;
2. each rank computes its count n_r, mean μ_r and M2_r = Σ(x − μ_r)² per channel in float64,
   all-gathers them, and combines them exactly (Chan et al.'s pairwise formula):

       N = Σ n_r      μ = Σ n_r·μ_r / N      M2 = Σ [M2_r + n_r·(μ_r − μ)²]      σ² = M2 / N

   every rank runs the same arithmetic on the same gathered numbers, so all get identical stats;
3. y = γ·(x − μ)/sqrt(σ² + ε) + β locally; the running statistics are updated on every rank with
   the global μ and the unbiased N/(N−1)·σ² (PyTorch's convention), unless the global statistics
   are not finite — then no rank updates (NaN on any rank makes them NaN on all);
4. backward all-reduces (Σ dy, Σ dy·x̂) per channel (float64) and, with N the global count,

       dx = γ·rstd·(dy − Σdy/N − x̂·Σ(dy·x̂)/N)

   dγ and dβ are the *local* sums, as in ``torch.nn.SyncBatchNorm``: DistributedDataParallel
   averages parameter gradients across ranks.

Eval mode uses the running statistics and needs no communication. Double backward through the
synchronized path is not supported (it raises).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import once_differentiable

from bnlab.errors import ShapeError
from bnlab.functional.running import report_nonfinite
from bnlab.torch import _checks
from bnlab.torch import functional as BF
from bnlab.torch._running import guarded_update_
from bnlab.torch.modules import _rebuild

STATS_DTYPE = torch.float64


# --------------------------------------------------------------------------- collectives


def _world_size(group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "SyncBatchNorm in training mode needs an initialized torch.distributed process group: "
            "call torch.distributed.init_process_group('gloo', ...) first (torchrun does the "
            "rendezvous), or use bnlab.torch.BatchNorm2d for a single process"
        )
    return dist.get_world_size(group)


def _all_gather(t: torch.Tensor, group) -> torch.Tensor:
    """(world, *t.shape): every rank's ``t``, in rank order."""
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t.contiguous(), group=group)
    return torch.stack(out)


def exchange_shapes(x: torch.Tensor, local_error: Exception | None, group) -> None:
    """Raise on every rank when channel counts or dims differ, or when any rank's input is bad."""
    ok_tensor = isinstance(x, torch.Tensor) and x.dim() > 1
    channels, dims = (x.shape[1], x.dim()) if ok_tensor else (-1, -1)
    info = torch.tensor([channels, dims, local_error is not None])
    table = _all_gather(info, group)
    if local_error is not None:
        raise local_error
    channels, dims = table[:, 0].tolist(), table[:, 1].tolist()
    if len(set(channels)) > 1 or len(set(dims)) > 1:
        raise ShapeError(
            "SyncBatchNorm: every process must feed the same number of channels and dims; got "
            f"channels {channels} and dims {dims} by rank"
        )
    bad = [r for r, flag in enumerate(table[:, 2].tolist()) if flag]
    if bad:
        raise RuntimeError(f"SyncBatchNorm: bad input on rank(s) {bad} (see their error)")


def local_moments(x: torch.Tensor) -> torch.Tensor:
    """[n, μ (C), M2 (C)] of this rank's shard in float64; n = 0 gives zeros."""
    c = x.shape[1]
    n = BF.values_per_channel(x)
    if n == 0:
        return torch.zeros(1 + 2 * c, dtype=STATS_DTYPE)
    var, mean = torch.var_mean(x.to(STATS_DTYPE), dim=BF.reduce_dims(x), correction=0)
    return torch.cat([torch.tensor([float(n)], dtype=STATS_DTYPE), mean, var * n])


def combine_moments(table: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(N, μ, σ²) of the union from rows [n_r, μ_r (C), M2_r (C)] (Chan et al.); exact in the
    sense that it equals the statistics of the concatenated shards up to float64 rounding."""
    c = (table.shape[1] - 1) // 2
    n, means, m2 = table[:, :1], table[:, 1 : 1 + c], table[:, 1 + c :]
    total = n.sum()
    mean = (n * means).sum(0) / total
    m2_total = (m2 + n * (means - mean) ** 2).sum(0)
    return int(total.item()), mean, m2_total / total


# --------------------------------------------------------------------------- autograd


class SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode synchronized batch norm (see the module docstring for the math)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, num_batches_tracked,
                momentum, eps, group, on_nonfinite):  # fmt: skip
        total, mean, var = combine_moments(_all_gather(local_moments(x), group))
        if total <= 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got "
                f"{total} value(s) per channel over all processes (local input size {x.size()})"
            )
        acc = BF.accumulation_dtype(x.dtype)
        y = BF.normalize(x, mean.to(acc), var.to(acc), weight, bias, eps).to(x.dtype)
        if running_mean is not None:  # bnlab's rule; identical numbers, so every rank agrees
            guarded_update_(running_mean, running_var, mean, var, total, momentum,
                            num_batches_tracked, on_nonfinite, "the global batch")  # fmt: skip
        elif not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
            report_nonfinite(on_nonfinite, "the global batch")
        ctx.save_for_backward(x, weight, mean, torch.rsqrt(var + eps))
        ctx.total, ctx.group = total, group
        return y  # elementwise ops keep x's memory format (channels_last stays channels_last)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        dims = BF.reduce_dims(x)
        xhat = (x.to(STATS_DTYPE) - BF.per_channel(mean, x)) * BF.per_channel(rstd, x)
        d = dy.to(STATS_DTYPE)
        local = torch.stack([d.sum(dims), (d * xhat).sum(dims)])  # (2, C): Σdy, Σdy·x̂
        sums = local.clone()
        dist.all_reduce(sums, group=ctx.group)
        g = rstd if weight is None else weight.to(STATS_DTYPE) * rstd
        mean_dy, mean_dy_xhat = (BF.per_channel(s / ctx.total, x) for s in sums)
        dx = BF.per_channel(g, x) * (d - mean_dy - xhat * mean_dy_xhat)
        need = ctx.needs_input_grad
        dgamma = local[1].to(weight.dtype) if need[1] else None
        dbeta = local[0].to(weight.dtype if weight is not None else x.dtype) if need[2] else None
        return (dx.to(x.dtype) if need[0] else None, dgamma, dbeta) + (None,) * 7


# --------------------------------------------------------------------------- module


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """``torch.nn.SyncBatchNorm`` that works on CPU (gloo): same constructor, buffers and
    ``state_dict`` keys. Input (N, C, ...) of any rank ≥ 2; statistics over all processes of
    ``process_group`` (default: the world) in training, the running statistics in eval.

    Not a subclass of ``nn.SyncBatchNorm``: DistributedDataParallel refuses those on CPU.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None, *, bias: bool = True) -> None:  # fmt: skip
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats,
            device=device, dtype=dtype, bias=bias,
        )  # fmt: skip
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training:  # running statistics (or local batch ones without buffers): no sync
            self._check_input_dim(input)
            no_buffers = self.running_mean is None and self.running_var is None
            return BF.batch_norm(
                input, self.running_mean, self.running_var, self.weight, self.bias,
                no_buffers, self.momentum, self.eps,
            )  # fmt: skip
        track = self.track_running_stats
        rm, rv = (self.running_mean, self.running_var) if track else (None, None)
        nbt = self.num_batches_tracked if track else None
        group = self.process_group
        if _world_size(group) == 1:
            self._check_input_dim(input)
            return BF.batch_norm(
                input, rm, rv, self.weight, self.bias, True, self.momentum, self.eps,
                num_batches_tracked=nbt,
            )  # fmt: skip
        return sync_batch_norm(
            input, rm, rv, self.weight, self.bias, self.momentum, self.eps, nbt, group,
            check_input=self._check_input_dim,
        )  # fmt: skip


def sync_batch_norm(x, running_mean, running_var, weight, bias, momentum, eps,
                    num_batches_tracked=None, group=None, on_nonfinite="warn",
                    check_input=None):  # fmt: skip
    """Training-mode batch norm over all processes of ``group``.

    Every check runs inside a try block whose outcome is exchanged with the other ranks *before*
    the statistics collective, so an error on one rank raises on all of them (no hang).
    ``check_input`` is an extra per-module check (e.g. the input dims). Shapes: x (N_r, C, ...)
    per rank, N_r may differ and be 0 or 1; vectors (C,).
    """
    error = None
    try:
        if check_input is not None:
            check_input(x)
        BF.check_tensor_args(x, running_mean, running_var, weight, bias)
        momentum = _checks.check_momentum(momentum, used=running_mean is not None)
        eps = _checks.check_eps(eps, batch_stats=True)
        _checks.check_policy(on_nonfinite)
        if running_mean is not None and momentum is None and num_batches_tracked is None:
            raise ValueError("momentum=None (cumulative moving average) needs num_batches_tracked")
    except (ValueError, TypeError, RuntimeError, NotImplementedError) as err:
        error = err
    exchange_shapes(x, error, group)
    return SyncBatchNormFunction.apply(
        x, weight, bias, running_mean, running_var, num_batches_tracked,
        momentum, eps, group, on_nonfinite,
    )  # fmt: skip


def convert_sync_batchnorm(model: nn.Module, process_group=None) -> nn.Module:
    """Replace every BatchNorm1d/2d/3d (torch's or bnlab's) by :class:`SyncBatchNorm`, keeping
    weights, statistics and mode; in place, returns the model (a bare BN module is converted)."""
    if isinstance(model, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
        new = _rebuild(model, SyncBatchNorm)
        new.process_group = process_group
        return new
    for name, child in model.named_children():
        new = convert_sync_batchnorm(child, process_group)
        if new is not child:
            setattr(model, name, new)
    return model
