"""``GhostBatchNorm1d/2d``: ghost batch norm (Hoffer et al. 2017) as modules, over
:mod:`bnlab.functional.ghost` (the formulas, the remainder rule and the running-statistics rules
are documented there).

A GhostBatchNorm module *is* a BatchNorm module (same parameters, buffers, state_dict keys and
inference); in training it normalizes each run of ``virtual_batch_size`` consecutive samples with
its own statistics. ``running_update="mean"`` (default: one update per forward with the mean over
the virtual batches) or ``"sequential"`` (one update per virtual batch).
"""

from __future__ import annotations

import numpy as np

from bnlab.functional.ghost import (
    check_ghost_options,
    ghost_batch_norm_backward,
    ghost_batch_norm_forward,
    ghost_options_repr,
)
from bnlab.nn._util import check_x
from bnlab.nn.norm import BatchNorm1d, BatchNorm2d, _accumulate_affine

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d"]


class _GhostMixin:
    """Shared by GhostBatchNorm1d/2d; put before the BatchNorm class in the bases."""

    def __init__(
        self,
        num_features,
        virtual_batch_size,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
        *,
        running_update: str = "mean",
        layout: str | None = None,
        dtype=np.float32,
        backend: str | None = None,
    ):
        vbs, running_update = check_ghost_options(virtual_batch_size, running_update)
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats,
            layout=layout, dtype=dtype, backend=backend,
        )  # fmt: skip
        self.virtual_batch_size = vbs
        self.running_update = running_update

    def extra_repr(self) -> str:
        ghost = ghost_options_repr(self.virtual_batch_size, self.running_update)
        return f"{super().extra_repr()}, {ghost}"

    def forward(self, x: np.ndarray) -> np.ndarray:
        check_x(x, tuple(self._layouts), type(self).__name__, self._expected)
        use_batch_stats = self.training or not self.track_running_stats
        update = self.training and self.track_running_stats
        y, cache = ghost_batch_norm_forward(
            x,
            None if self.weight is None else self.weight.data,
            None if self.bias is None else self.bias.data,
            training=use_batch_stats,
            virtual_batch_size=self.virtual_batch_size,
            running_mean=self.running_mean,  # None when not tracking running statistics
            running_var=self.running_var,
            momentum=self.momentum,
            eps=self.eps,
            layout=self._layout_for(x),
            convention="pytorch",
            num_batches_tracked=self.num_batches_tracked if update else None,
            backend=self.backend,
            running_update=self.running_update,
        )
        self._cache = cache if self._need_cache() else None
        return y

    def backward(self, dout: np.ndarray) -> np.ndarray:
        dx, dgamma, dbeta = ghost_batch_norm_backward(dout, self._cached())
        _accumulate_affine(self, dgamma, dbeta)
        return dx


class GhostBatchNorm1d(_GhostMixin, BatchNorm1d):
    """Ghost batch norm of (N, C) or (N, C, L) input; a ``BatchNorm1d`` in state_dict and
    inference. ``GhostBatchNorm1d(num_features, virtual_batch_size, eps, momentum, ...)``."""


class GhostBatchNorm2d(_GhostMixin, BatchNorm2d):
    """Ghost batch norm of (N, C, H, W) input; a ``BatchNorm2d`` in state_dict and inference.
    ``GhostBatchNorm2d(num_features, virtual_batch_size, eps, momentum, ...)``."""
