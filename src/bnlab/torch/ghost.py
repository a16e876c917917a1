"""``GhostBatchNorm1d/2d`` for PyTorch: ghost batch norm (Hoffer et al. 2017) as drop-in
``torch.nn.BatchNorm1d/2d`` subclasses.

Same constructor arguments (plus ``virtual_batch_size`` and ``running_update``), parameters,
buffers and state_dict keys as ``nn.BatchNorm*d``; inference is batch norm's. In training the
batch is split along N into virtual batches (``torch.split``: the last one holds the remainder),
each normalized with its own statistics by :func:`bnlab.torch.functional.batch_norm` (autograd
through bnlab's fast path), and the running statistics are updated by the very function the NumPy
path uses, :func:`bnlab.functional.ghost.update_ghost_running_stats` (rules ``"mean"``, default,
and ``"sequential"``: see :mod:`bnlab.functional.ghost`). A virtual batch with NaN/Inf leaves
every buffer unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from bnlab.functional.ghost import (
    check_ghost_options,
    ghost_options_repr,
    training_slices,
    update_ghost_running_stats,
)
from bnlab.torch import functional as BF

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d"]


class _GhostMixin:
    """The forward shared by GhostBatchNorm1d/2d (put before the ``nn`` class in the bases)."""

    backend: str | None = None  # bnlab backend of the per-virtual-batch fast path

    def __init__(
        self,
        num_features: int,
        virtual_batch_size: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        running_update: str = "mean",
    ):
        vbs, running_update = check_ghost_options(virtual_batch_size, running_update)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.virtual_batch_size = vbs
        self.running_update = running_update

    def extra_repr(self) -> str:
        ghost = ghost_options_repr(self.virtual_batch_size, self.running_update)
        return f"{super().extra_repr()}, {ghost}"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not self.training and self.running_mean is not None:
            return BF.batch_norm(
                input, self.running_mean, self.running_var, self.weight, self.bias, False,
                self.momentum, self.eps, backend=self.backend,
            )  # fmt: skip
        per_sample = input[:1].numel() // max(input.shape[1], 1) if input.shape[0] else 0
        layout = {2: "NC", 3: "NCL", 4: "NCHW"}[input.dim()]
        slices = training_slices(tuple(input.shape), per_sample, self.virtual_batch_size, layout)
        chunks = [input[s] for s in slices]
        outs = [
            BF.batch_norm(c, None, None, self.weight, self.bias, True, 0.0, self.eps,
                          backend=self.backend)
            for c in chunks
        ]  # fmt: skip
        if self.training and self.track_running_stats:
            self._update_running(chunks, per_sample)
        return torch.cat(outs)

    @torch.no_grad()
    def _update_running(self, chunks: list[torch.Tensor], per_sample: int) -> None:
        dims = [0, *range(2, chunks[0].dim())]
        stats = [torch.var_mean(c.double(), dim=dims, unbiased=False) for c in chunks]
        if not all(torch.isfinite(v).all() and torch.isfinite(m).all() for v, m in stats):
            return  # bnlab's rule: a non-finite batch never reaches the buffers
        update_ghost_running_stats(
            self.running_mean.numpy(), self.running_var.numpy(),  # views: updated in place
            [m.numpy() for _, m in stats], [v.numpy() for v, _ in stats],
            [c.shape[0] * per_sample for c in chunks], self.momentum, "pytorch",
            self.num_batches_tracked.numpy(), self.running_update,
        )  # fmt: skip


class GhostBatchNorm1d(_GhostMixin, nn.BatchNorm1d):
    """Ghost batch norm of (N, C) or (N, C, L) input; an ``nn.BatchNorm1d`` in state and eval.
    ``GhostBatchNorm1d(num_features, virtual_batch_size, eps, momentum, ...)``."""


class GhostBatchNorm2d(_GhostMixin, nn.BatchNorm2d):
    """Ghost batch norm of (N, C, H, W) input; an ``nn.BatchNorm2d`` in state and eval.
    ``GhostBatchNorm2d(num_features, virtual_batch_size, eps, momentum, ...)``."""
