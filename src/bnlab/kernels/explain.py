"""``explain``: what a call of ``bnlab.functional`` will run, and why, without running it.

    >>> print(explain(np.zeros((64, 64, 56, 56), np.float32), "NCHW"))   # doctest: +SKIP
    batch_norm NCHW (64, 64, 56, 56) float32: numba kernels (12845056 values >= 4096: ...)
      path cf-single-launch: rows of 3136 values; a channel (784 KiB) stays in cache
      view (64, 64, 3136), 2 threads, parallel, streaming stores when aligned like x
      train_forward: cf_train_forward
      backward: cf_backward

It answers from the same functions the call uses (the seam's backend choice and the plan table),
and imports no kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .paths import Plan, plan


@dataclass
class Explanation:
    norm: str
    layout: str
    shape: tuple[int, ...]
    dtype: str
    backend: str  # "numba" or "numpy"
    reason: str
    plan: Plan | None = None  # None when the NumPy reference runs
    directions: tuple[str, ...] = ()  # which kernel directions the call (and its backward) runs
    staging: list[str] = field(default_factory=list)

    @property
    def kernels(self) -> dict[str, tuple[str, ...]]:
        if self.plan is None:
            return {}
        return {d: self.plan.kernels[d] for d in self.directions}

    def as_dict(self) -> dict:
        return {
            "norm": self.norm,
            "layout": self.layout,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "backend": self.backend,
            "reason": self.reason,
            "plan": None if self.plan is None else self.plan.as_dict(),
            "kernels": {k: list(v) for k, v in self.kernels.items()},
            "staging": list(self.staging),
        }

    def __str__(self) -> str:
        runs = "numba kernels" if self.backend == "numba" else "the NumPy reference"
        lines = [f"{self.norm} {self.layout} {self.shape} {self.dtype}: {runs} ({self.reason})"]
        if self.plan is not None:
            p = self.plan
            lines.append(f"  path {p.path}: {p.reason}")
            how = "parallel" if p.parallel else "one thread (a small pass)"
            stream = ", streaming stores when aligned like x" if p.stream else ""
            lines.append(f"  view {p.view}, {p.threads} threads, {how}{stream}")
            lines += [f"  {d}: {', '.join(k)}" for d, k in self.kernels.items()]
        lines += [f"  staging: {s}" for s in self.staging]
        return "\n".join(lines)


def _staging(x) -> list[str]:
    notes = []
    dt = np.dtype(x.dtype)
    if dt.type is np.float16:
        notes.append("float16 is computed in a float32 copy (numba has no float16 arithmetic)")
    elif not dt.isnative:
        notes.append("byte-swapped input is computed in a native copy")
    if isinstance(x, np.ndarray) and not (x.flags.c_contiguous and x.flags.aligned):
        notes.append("strided or misaligned input is computed in a C-contiguous copy")
    return notes


def explain(x, layout: str = "NCHW", *, norm: str = "batch_norm", training: bool = True,
            backend: str | None = None, normalized_shape=None, num_groups: int | None = None,
            threads: int | None = None) -> Explanation:  # fmt: skip
    """Which backend, path and kernels ``norm``'s forward (and its backward) run for x.

    ``norm``: ``"batch_norm"`` (``layout``, ``training``), ``"layer_norm"``
    (``normalized_shape``, default the last axis) or ``"group_norm"`` (``layout``,
    ``num_groups``). ``backend`` as in the call (None: the default, size-aware); ``threads``
    None: the cores this process may use."""
    from bnlab.functional._dispatch import choose

    shape = tuple(int(s) for s in x.shape)
    size = int(np.prod(shape))
    mode = "train" if training or norm != "batch_norm" else "eval"
    choice = choose(backend, norm, mode, size)
    base = dict(norm=norm, layout=layout, shape=shape, dtype=str(np.dtype(x.dtype)))
    if norm == "group_norm" and layout in ("NHWC", "NLC"):
        reason = "channels-last group norm has no kernels"
        return Explanation(backend="numpy", reason=reason, **base)
    if choice.backend == "numpy":
        return Explanation(backend="numpy", reason=choice.reason, **base)
    if norm == "batch_norm":
        p = plan(shape, layout, x.dtype, threads)
        directions = (
            ("train_forward", "backward") if training else ("eval_forward", "eval_backward")
        )
    elif norm == "layer_norm":
        k = 1 if normalized_shape is None else len(np.atleast_1d(normalized_shape))
        d = int(np.prod(shape[len(shape) - k :]))
        p = plan((size // d, d), layout, x.dtype, threads, "layer_norm")
        directions = ("forward", "backward")
    else:
        p = plan(shape, layout, x.dtype, threads, "group_norm", num_groups=num_groups or 1)
        directions = ("forward", "backward")
    return Explanation(backend="numba", reason=choice.reason, plan=p, directions=directions,
                       staging=_staging(x), **base)  # fmt: skip
