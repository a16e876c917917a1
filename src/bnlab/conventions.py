"""Running-statistics conventions of the frameworks and textbooks, written down once.

Each framework keeps an exponential moving average of the batch statistics for inference,
but they disagree on three details (see ``docs/conventions.md`` for the formulas):

========= ======================= ======= ======================== =======
preset    ``momentum`` weighs      default running variance         eps
========= ======================= ======= ======================== =======
pytorch   the new batch           0.1     unbiased  n/(n−1)·σ²_B   1e-5
keras     the old running value   0.99    biased    σ²_B           1e-3
flax      the old running value   0.99    biased    σ²_B           1e-5
cs231n    the old running value   0.9     biased    σ²_B           1e-5
d2l-0.17  the old running value   0.9     biased    σ²_B           1e-5
d2l-1.0   the new batch           0.1     biased    σ²_B           1e-5
d2l       the same as d2l-0.17 (the name bnlab has always used for it)
========= ======================= ======= ======================== =======

d2l's two published versions mean opposite things by ``momentum``: up to release 0.17 its
``batch_norm`` computes ``momentum · moving + (1 − momentum) · stat`` with 0.9, from d2l 1.0 on
``(1 − momentum) · moving + momentum · stat`` with 0.1. Both give the same averages with their own
defaults; a value meant for one and given to the other does not.

With ``w`` the weight of the new batch (``w = momentum`` for pytorch and d2l-1.0,
``1 − momentum`` otherwise):

    running_mean ← (1 − w) · running_mean + w · μ_B
    running_var  ← (1 − w) · running_var  + w · v_B,   v_B = n/(n−1)·σ²_B (unbiased) or σ²_B

Every preset normalizes the *training* batch with the biased σ²_B and puts eps inside the sqrt.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class NormConvention:
    """How a framework maintains running statistics."""

    name: str
    momentum: float  # default momentum value, in this convention's own meaning
    momentum_weighs_new: bool  # True: momentum is the weight of the new batch (PyTorch)
    unbiased_running_var: bool  # True: running_var accumulates n/(n-1)·σ²_B
    eps: float

    def new_batch_weight(self, momentum: float) -> float:
        """The weight ``w`` of the new batch statistics for a momentum value in this convention."""
        return float(momentum) if self.momentum_weighs_new else 1.0 - float(momentum)

    def momentum_for_weight(self, weight: float) -> float:
        """Inverse of :meth:`new_batch_weight`."""
        return float(weight) if self.momentum_weighs_new else 1.0 - float(weight)


PRESETS: dict[str, NormConvention] = {
    "pytorch": NormConvention("pytorch", 0.1, True, True, 1e-5),
    "keras": NormConvention("keras", 0.99, False, False, 1e-3),
    "flax": NormConvention("flax", 0.99, False, False, 1e-5),
    "cs231n": NormConvention("cs231n", 0.9, False, False, 1e-5),
    "d2l-0.17": NormConvention("d2l-0.17", 0.9, False, False, 1e-5),
    "d2l-1.0": NormConvention("d2l-1.0", 0.1, True, False, 1e-5),
    "d2l": NormConvention("d2l", 0.9, False, False, 1e-5),  # = d2l-0.17
}

#: Presets of one source whose ``momentum`` means opposite weights (see :func:`momentum_lookalike`).
FAMILIES: tuple[tuple[str, ...], ...] = (("d2l-0.17", "d2l-1.0", "d2l"),)


def get_convention(convention: str | NormConvention) -> NormConvention:
    """Look up a preset by name (or pass a NormConvention through)."""
    if isinstance(convention, NormConvention):
        return convention
    try:
        return PRESETS[convention]
    except (KeyError, TypeError):
        raise ValueError(
            f"convention must be one of {sorted(PRESETS)}, got {convention!r}"
        ) from None


def momentum_lookalike(momentum, convention: str | NormConvention) -> NormConvention | None:
    """The preset of the same family (d2l's two versions) for which ``momentum`` is the default
    while it means the opposite weight, or None: a hint that the value was written for the other
    version. ``momentum_lookalike(0.1, "d2l")`` is the d2l-1.0 preset (0.1 weighs the new batch
    there, the old value here); the convention's own default is never a lookalike.
    """
    conv = get_convention(convention)
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float, np.floating)):
        return None
    family = next((f for f in FAMILIES if conv.name in f), ())
    for name in family:
        other = PRESETS[name]
        if (
            other.momentum_weighs_new != conv.momentum_weighs_new
            and np.isclose(float(momentum), other.momentum, rtol=0, atol=1e-12)
            and not np.isclose(float(momentum), conv.momentum, rtol=0, atol=1e-12)
        ):
            return other
    return None


def convert_momentum(momentum: float, src: str, dst: str) -> float:
    """The momentum in ``dst``'s meaning giving the same update as ``momentum`` in ``src``.

    >>> convert_momentum(0.1, "pytorch", "keras")
    0.9
    """
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float, np.floating)):
        raise TypeError(f"momentum must be a float in [0, 1], got {momentum!r}")
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
    w = get_convention(src).new_batch_weight(momentum)
    return round(get_convention(dst).momentum_for_weight(w), 15)


def convert_running_stats(
    running_mean: np.ndarray,
    running_var: np.ndarray,
    src: str,
    dst: str,
    *,
    count: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Convert running statistics accumulated under ``src`` into what ``dst`` would hold.

    The mean needs no conversion. The variance differs between an unbiased and a biased preset by
    the factor n/(n−1), where n is the number of values per channel in each training batch
    (N·H·W for NCHW). The moving average is linear, so the conversion is *exact* when every batch
    had the same ``count`` n, and only approximate otherwise; without ``count`` it is impossible
    and a ValueError says so. The initial value (running_var = 1) is scaled along with the
    batch statistics; its weight after k updates is (1 − w)^k, so a model trained a few hundred
    steps carries none of it, but a freshly initialised one differs by that term.
    Note eps is not part of the statistics: a model moved between presets with different eps
    (keras 1e-3 vs pytorch 1e-5) must also carry its eps over.
    """
    s, d = get_convention(src), get_convention(dst)
    mean = np.array(running_mean, copy=True)
    var = np.array(running_var, copy=True)
    if s.unbiased_running_var == d.unbiased_running_var:
        return mean, var
    if count is None:
        raise ValueError(
            f"count is required to convert running_var from {s.name!r} "
            f"({'unbiased' if s.unbiased_running_var else 'biased'}) to {d.name!r} "
            f"({'unbiased' if d.unbiased_running_var else 'biased'}): the factor n/(n-1) depends "
            "on the number of values per channel in each training batch"
        )
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 2:
        raise ValueError(f"count must be an int >= 2 (values per channel per batch), got {count!r}")
    factor = int(count) / (int(count) - 1)
    var = var * factor if d.unbiased_running_var else var / factor
    return mean, var
