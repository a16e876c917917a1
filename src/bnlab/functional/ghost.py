"""Ghost Batch Normalization (Hoffer, Hubara, Soudry 2017, "Train longer, generalize better").

Training splits the batch along N into *virtual batches* of ``virtual_batch_size`` samples
(contiguous slices x[0:v], x[v:2v], ...) and batch-normalizes each one with its own statistics:

    for each virtual batch B_k:  μ_k, σ²_k = batch statistics of B_k   (per channel, biased)
                                 y[B_k]    = γ·(x[B_k] − μ_k)/sqrt(σ²_k + ε) + β

Each virtual batch goes through :func:`bnlab.functional.batch_norm_forward` / ``_backward``, so the
fused kernels serve ghost batch norm too. The backward is the sum of the independent per-slice
backwards (dγ, dβ add up; dx is assembled slice by slice). Inference is plain batch norm with the
running statistics.

**Batch size not a multiple of virtual_batch_size.** Like ``torch.split``, the last virtual batch
holds the remainder (N mod v samples): N = 10, v = 4 gives virtual batches of 4, 4 and 2. If that
remainder leaves a single value per channel (e.g. NC layout, remainder 1) its statistics are
undefined and a ValueError names ``virtual_batch_size``. ``virtual_batch_size >= N`` is one
virtual batch: plain batch norm.

**Running statistics** (``running_update``):

``"mean"`` (default)  one update per call, with the sample-weighted mean over the virtual batches
    of their means and of their variances (each variance in the convention's form, i.e. unbiased
    n_k/(n_k−1)·σ²_k for pytorch):  μ̄ = Σ_k (n_k/N)·μ_k,  v̄ = Σ_k (n_k/N)·v_k,  then
    r ← (1 − w)·r + w·(μ̄, v̄). Why the default: ``momentum`` and ``num_batches_tracked`` keep
    batch norm's meaning (one update per optimizer step, whatever the number of virtual batches),
    the result does not depend on the order of the samples, and v̄ estimates exactly what
    inference needs: the variance *inside* a virtual batch, which is what training normalized by.
``"sequential"``  one update per virtual batch, in order, as if batch norm had been called on each
    slice (what chunk-by-chunk implementations, e.g. Hoffer et al.'s reference code, do). With k
    virtual batches the old running value decays by (1 − w)^k per call and later slices weigh more.

Both give batch norm's update exactly when there is one virtual batch. Either way the buffers are
updated only after every virtual batch was computed and found finite, so an error or a NaN leaves
them untouched.

Shapes: x in ``layout`` (N first in every layout); γ, β, running_mean, running_var (C,).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from bnlab.conventions import get_convention
from bnlab.errors import ShapeError
from bnlab.functional import _dispatch
from bnlab.functional import _validate as v
from bnlab.functional._bn_args import (
    PRESET,
    check_cumulative_counter,
    check_running_buffers,
    resolve_momentum,
)
from bnlab.functional._layout import Layout, check_input
from bnlab.functional.batch_norm import (
    BatchNormCache,
    batch_norm_backward,
    batch_norm_forward,
)
from bnlab.functional.running import batch_is_finite, update_running_stats
from bnlab.functional.stats import reduction_size

__all__ = [
    "RUNNING_UPDATES",
    "GhostCache",
    "check_ghost_options",
    "check_virtual_batch_size",
    "ghost_options_repr",
    "ghost_batch_norm_backward",
    "ghost_batch_norm_forward",
    "training_slices",
    "update_ghost_running_stats",
    "virtual_batches",
]

RUNNING_UPDATES = ("mean", "sequential")


def check_virtual_batch_size(virtual_batch_size) -> int:
    """A positive integer (not a bool, not a float)."""
    if isinstance(virtual_batch_size, bool) or not isinstance(
        virtual_batch_size, (int, np.integer)
    ):
        raise TypeError(
            f"virtual_batch_size must be a positive integer, got {virtual_batch_size!r}"
        )
    if virtual_batch_size < 1:
        raise ValueError(f"virtual_batch_size must be >= 1, got {virtual_batch_size!r}")
    return int(virtual_batch_size)


def check_running_update(running_update) -> str:
    """One of RUNNING_UPDATES ("mean": one update per call, "sequential": one per virtual batch)."""
    if running_update not in RUNNING_UPDATES:
        raise ValueError(f"running_update must be one of {RUNNING_UPDATES}, got {running_update!r}")
    return running_update


def check_ghost_options(virtual_batch_size, running_update) -> tuple[int, str]:
    """What Ghost BN adds to batch norm's arguments, checked in this order (forward and modules)."""
    return check_virtual_batch_size(virtual_batch_size), check_running_update(running_update)


def ghost_options_repr(virtual_batch_size: int, running_update: str) -> str:
    """The part of a Ghost BN module's repr that batch norm's lacks (NumPy and torch modules)."""
    return f"virtual_batch_size={virtual_batch_size}, running_update={running_update!r}"


def virtual_batches(n: int, virtual_batch_size: int) -> list[slice]:
    """The contiguous slices along N: [0:v], [v:2v], ..., the last one holding the remainder."""
    vbs = check_virtual_batch_size(virtual_batch_size)
    return [slice(i, min(i + vbs, n)) for i in range(0, n, vbs)]


def training_slices(shape: tuple[int, ...], per_sample: int, virtual_batch_size: int, layout: str):
    """The virtual batches of a training batch of ``shape`` (N first), each checked to hold at
    least 2 values per channel (``per_sample`` values per channel per sample)."""
    if shape[0] == 0:
        raise ShapeError(f"x must not be empty when training, got shape {tuple(shape)}")
    slices = virtual_batches(shape[0], virtual_batch_size)
    for s in slices:
        if (s.stop - s.start) * per_sample < 2:
            raise ValueError(
                f"virtual_batch_size={virtual_batch_size} splits a batch of N={shape[0]} into "
                f"virtual batches of sizes {[sl.stop - sl.start for sl in slices]}; the one at "
                f"samples [{s.start}:{s.stop}] has a single value per channel (layout "
                f"{layout!r}), whose statistics are undefined. Choose a virtual_batch_size that "
                "divides N or leaves a remainder of at least 2 samples."
            )
    return slices


@dataclass
class GhostCache:
    """Per-virtual-batch batch-norm caches and their slices along N (one cache in inference)."""

    caches: list[BatchNormCache]
    slices: list[slice]
    shape: tuple[int, ...]
    dtype: np.dtype
    layout: Layout


def update_ghost_running_stats(
    running_mean: np.ndarray,
    running_var: np.ndarray,
    means: list[np.ndarray],
    variances: list[np.ndarray],
    counts: list[int],
    momentum: float | None,
    convention,
    num_batches_tracked: np.ndarray | None = None,
    running_update: str = "mean",
) -> None:
    """Update the buffers in place from the statistics of k virtual batches (the rules of the
    module docstring). ``means``/``variances`` are (C,) per virtual batch, variances biased;
    ``counts`` the number of values per channel of each. Shared by the NumPy and torch paths.

        "mean":        μ̄ = Σ_k (m_k/M)·μ_k,  v̄ = Σ_k (m_k/M)·v_k  (v_k in the convention's form),
                       then one update  r ← (1 − w)·r + w·(μ̄, v̄)
        "sequential":  one update per virtual batch, in order
    """
    conv = get_convention(convention)
    if running_update == "sequential":
        for mean, var, count in zip(means, variances, counts, strict=True):
            update_running_stats(
                running_mean, running_var, mean, var, count, momentum, conv, num_batches_tracked
            )
        return
    total = sum(counts)
    mean_bar = sum((m / total) * mu for m, mu in zip(counts, means, strict=True))
    var_bar = 0.0
    for m, var in zip(counts, variances, strict=True):
        var_bar = var_bar + (m / total) * (
            var * (m / (m - 1)) if conv.unbiased_running_var else var
        )
    # var_bar is already in the convention's form: tell update_running_stats not to correct it.
    as_is = dataclasses.replace(conv, unbiased_running_var=False)
    update_running_stats(
        running_mean, running_var, mean_bar, var_bar, 2, momentum, as_is, num_batches_tracked
    )


def ghost_batch_norm_forward(
    x: np.ndarray,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    *,
    training: bool,
    virtual_batch_size: int,
    running_mean: np.ndarray | None = None,
    running_var: np.ndarray | None = None,
    momentum: float | None | str = PRESET,
    eps: float = 1e-5,
    layout: str = "NCHW",
    convention: str = "pytorch",
    num_batches_tracked: np.ndarray | None = None,
    on_nonfinite: str = "warn",
    backend: str | None = None,
    running_update: str = "mean",
) -> tuple[np.ndarray, GhostCache]:
    """Ghost batch norm forward; returns ``(out, cache)`` for :func:`ghost_batch_norm_backward`.

    Arguments are those of :func:`bnlab.functional.batch_norm_forward` plus ``virtual_batch_size``
    (a positive int; see the module docstring for a remainder) and ``running_update``
    (``"mean"`` or ``"sequential"``, see the module docstring). Inference ignores
    ``virtual_batch_size``: it is batch norm with the running statistics.

    The cache keeps x by reference, as batch norm's does: keep x unchanged until the backward
    (or pass a copy); a modified x makes the backward raise
    :class:`~bnlab.errors.InputModifiedError` rather than return wrong gradients.
    """
    lay = check_input(x, layout)
    training = v.check_training(training)
    vbs, running_update = check_ghost_options(virtual_batch_size, running_update)
    conv = get_convention(convention)
    momentum = resolve_momentum(momentum, conv)
    c = x.shape[lay.channel_axis]
    check_running_buffers(running_mean, running_var, num_batches_tracked, c, training)
    choice = _dispatch.choose(backend, "batch_norm", "train" if training else "eval", x.size)
    common = dict(eps=eps, layout=lay.name, on_nonfinite=on_nonfinite, backend=choice.backend)

    if not training:
        y, bn = batch_norm_forward(
            x, gamma, beta, training=False, running_mean=running_mean, running_var=running_var,
            **common,
        )  # fmt: skip
        return y, GhostCache([bn], [slice(0, x.shape[0])], x.shape, x.dtype, lay)

    tracking = running_mean is not None
    check_cumulative_counter(momentum, num_batches_tracked, tracking)
    slices = training_slices(x.shape, reduction_size(x.shape, lay.spatial_axes), vbs, lay.name)
    y = np.empty(x.shape, x.dtype)  # C-contiguous: every y[s] is a contiguous view
    caches = []
    for s in slices:
        # A non-finite virtual batch is reported here (warn or raise) by batch_norm_forward.
        _, cache = batch_norm_forward(x[s], gamma, beta, training=True, out=y[s], **common)
        caches.append(cache)
    if tracking and all(batch_is_finite(cc.mean, cc.var) for cc in caches):
        per_sample = reduction_size(x.shape, lay.spatial_axes)
        update_ghost_running_stats(
            running_mean, running_var, [cc.mean for cc in caches], [cc.var for cc in caches],
            [(s.stop - s.start) * per_sample for s in slices], momentum, conv,
            num_batches_tracked, running_update,
        )  # fmt: skip
    return y, GhostCache(caches, slices, x.shape, x.dtype, lay)


def ghost_batch_norm_backward(dout: np.ndarray, cache: GhostCache):
    """Backward of :func:`ghost_batch_norm_forward`; returns (dx, dgamma, dbeta).

    Virtual batches are independent given γ, β, so for each slice B_k
    ``dx[B_k], dγ_k, dβ_k = batch_norm_backward(dout[B_k])`` and dγ = Σ_k dγ_k, dβ = Σ_k dβ_k.
    """
    if not isinstance(cache, GhostCache):
        raise TypeError(
            f"cache must be the GhostCache from ghost_batch_norm_forward, got {cache!r}"
        )
    check_input(dout, cache.layout, "dout")
    if dout.shape != cache.shape:
        raise ShapeError(f"dout must have the shape of x {cache.shape}, got {dout.shape}")
    dx = np.empty(cache.shape, cache.dtype)
    dgamma = dbeta = 0.0
    for s, c in zip(cache.slices, cache.caches, strict=True):
        _, dg, db = batch_norm_backward(dout[s], c, out=dx[s])
        dgamma, dbeta = dgamma + dg, dbeta + db
    return dx, dgamma, dbeta
