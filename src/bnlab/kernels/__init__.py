"""Multi-core numba kernels for batch norm (the ``"numba"`` backend of bnlab.functional), and
layer norm (M, D) and group norm (N, C, S) with the same reduction primitive.

``plan(shape, layout, dtype, threads)`` says which path and kernels a call runs (a table in
:mod:`.plan`); ``explain(x, ...)`` also says whether the call runs the kernels at all (the default
backend runs the NumPy reference below a measured size). Importing this package does not import
numba; each kernel module is imported, and each kernel loaded from numba's disk cache, on the
first call that needs it. See ``docs/kernels.md`` for the paths and their measured gains.
"""

from __future__ import annotations

from .explain import Explanation, explain
from .paths import Plan, plan

_LAZY = {
    "bn_train_forward": "batch_norm",
    "bn_eval_forward": "batch_norm",
    "bn_backward": "batch_norm",
    "bn_eval_backward": "batch_norm",
    "channel_moments": "batch_norm",
    "ln_forward": "layer_norm",
    "ln_backward": "layer_norm",
    "gn_forward": "group_norm",
    "gn_backward": "group_norm",
}


def __getattr__(name: str):
    """The kernel functions, imported on first use (layer and group norm import numba)."""
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Explanation", "Plan", "explain", "plan", *_LAZY]
