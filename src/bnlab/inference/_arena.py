"""The plan of one forward pass (steps and buffers) and the arena its buffers come from.

A plan step is ``(function, *args)``; an argument that is a list is an arena slot (or a list of
slots), which :func:`bind` resolves into the arrays once the arena is allocated, making each
step a closure without arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Plan:
    """Buffers and bound steps for one input shape (N, H, W)."""

    x_nhwc: np.ndarray
    steps: list = field(default_factory=list)
    labels: list = field(default_factory=list)  # one per step, for profiles
    output: np.ndarray | None = None  # NHWC map (N, H, W, C) or vector (N, C)


class Arena:
    """Flat float32 buffers; a released buffer is reused by the next value that needs one."""

    def __init__(self):
        self.sizes: list[int] = []
        self.free: list[int] = []
        self.requests: list[tuple[int, tuple[int, ...], list]] = []

    def take(self, size: int) -> int:
        fits = [b for b in self.free if self.sizes[b] >= size]
        pick = (
            min(fits, key=lambda b: self.sizes[b])
            if fits
            else (max(self.free, key=lambda b: self.sizes[b]) if self.free else None)
        )
        if pick is None:
            self.sizes.append(0)
            pick = len(self.sizes) - 1
        else:
            self.free.remove(pick)
        self.sizes[pick] = max(self.sizes[pick], size)
        return pick

    def release(self, buf: int) -> None:
        self.free.append(buf)

    def view(self, buf: int, shape) -> list:
        slot: list = []
        self.requests.append((buf, tuple(shape), slot))
        return slot

    def materialize(self) -> None:
        flat = [np.empty(n, np.float32) for n in self.sizes]
        for buf, shape, slot in self.requests:
            slot.append(flat[buf][: int(np.prod(shape))].reshape(shape))


def bind(step):
    fn, *args = step
    resolved = [_resolve(a) for a in args]
    return lambda: fn(*resolved)


def _resolve(a):
    if isinstance(a, list) and a and isinstance(a[0], list):  # a list of slots (concat)
        return [s[0] for s in a]
    return a[0] if isinstance(a, list) else a


def label(step) -> str:
    """'packed_gemm 1x1', 'winograd_conv 3x3', 'depthwise_conv 5x5/2', 'maxpool'...: what a
    step is, for profiles."""
    from bnlab.inference._packing import PackedConv  # noqa: PLC0415

    fn, *args = step
    conv = next((a for a in args if isinstance(a, PackedConv)), None)
    kind = fn.__name__
    if conv is None:
        return kind + (" linear" if kind == "packed_gemm" else "")
    (kh, kw), s = conv.kernel, conv.stride[0]
    return f"{kind} {kh}x{kw}" + (f"/{s}" if s > 1 else "")
