"""``BatchRenorm1d/2d``: batch renormalization (Ioffe 2017) as modules, over
:mod:`bnlab.functional.renorm` (the formulas are there).

A BatchRenorm module *is* a BatchNorm module (same arguments, parameters, buffers and state_dict
keys, same inference), so checkpoints, folding and recalibration treat it as one. Only training
differs: the output is corrected by the per-channel r, d (clipped to rmax, dmax) toward what the
running statistics would give.

``rmax``/``dmax`` are fixed limits, or pass ``schedule=RenormSchedule(...)`` for the paper's
warm-up: the limits are then ``schedule(step)`` with ``step = num_batches_tracked`` (the number
of training forwards so far, saved in the state_dict, so a resumed run continues the ramp).
"""

from __future__ import annotations

import numpy as np

from bnlab.functional.renorm import (
    RenormSchedule,
    batch_renorm_backward,
    batch_renorm_forward,
    check_renorm_limits,
)
from bnlab.nn._util import check_x
from bnlab.nn.norm import BatchNorm1d, BatchNorm2d, _accumulate_affine

__all__ = ["BatchRenorm1d", "BatchRenorm2d"]


class _RenormMixin:
    """Shared by BatchRenorm1d/2d; put before the BatchNorm class in the bases."""

    def __init__(
        self,
        num_features,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
        *,
        rmax: float = 3.0,
        dmax: float = 5.0,
        schedule: RenormSchedule | None = None,
        layout: str | None = None,
        dtype=np.float32,
        backend: str | None = None,
    ):
        if not track_running_stats:
            raise ValueError(
                "track_running_stats must be True for batch renorm: r and d are computed from "
                "the running statistics"
            )
        if momentum is None:
            raise ValueError(
                "momentum must be a float for batch renorm (the paper's moving average), got None"
            )
        if schedule is not None and not isinstance(schedule, RenormSchedule):
            raise TypeError(f"schedule must be a RenormSchedule or None, got {schedule!r}")
        super().__init__(
            num_features, eps, momentum, affine, True, layout=layout, dtype=dtype, backend=backend
        )
        self.rmax, self.dmax = check_renorm_limits(rmax, dmax)
        self.schedule = schedule

    def current_limits(self) -> tuple[float, float]:
        """(rmax, dmax) the next training forward will use."""
        if self.schedule is None:
            return self.rmax, self.dmax
        return self.schedule(int(self.num_batches_tracked))

    def extra_repr(self) -> str:
        limits = (
            f"schedule={self.schedule}" if self.schedule else f"rmax={self.rmax}, dmax={self.dmax}"
        )
        return f"{super().extra_repr()}, {limits}"

    def forward(self, x: np.ndarray) -> np.ndarray:
        check_x(x, tuple(self._layouts), type(self).__name__, self._expected)
        rmax, dmax = self.current_limits()
        y, cache = batch_renorm_forward(
            x,
            None if self.weight is None else self.weight.data,
            None if self.bias is None else self.bias.data,
            training=self.training,
            running_mean=self.running_mean,
            running_var=self.running_var,
            rmax=rmax,
            dmax=dmax,
            momentum=self.momentum,
            eps=self.eps,
            layout=self._layout_for(x),
            convention="pytorch",
            num_batches_tracked=self.num_batches_tracked if self.training else None,
            backend=self.backend,
        )
        self._cache = cache if self._need_cache() else None
        return y

    def backward(self, dout: np.ndarray) -> np.ndarray:
        dx, dgamma, dbeta = batch_renorm_backward(dout, self._cached())
        _accumulate_affine(self, dgamma, dbeta)
        return dx


class BatchRenorm1d(_RenormMixin, BatchNorm1d):
    """Batch renorm of (N, C) or (N, C, L) input; a ``BatchNorm1d`` in state_dict and inference.

    Extra keyword arguments: ``rmax`` (>= 1), ``dmax`` (>= 0) or ``schedule``.
    """


class BatchRenorm2d(_RenormMixin, BatchNorm2d):
    """Batch renorm of (N, C, H, W) input; a ``BatchNorm2d`` in state_dict and inference.

    Extra keyword arguments: ``rmax`` (>= 1), ``dmax`` (>= 0) or ``schedule``.
    """
