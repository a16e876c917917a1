"""Which kernels a call runs: one table, a function of the shape, layout and dtype only.

    plan(shape, layout, dtype, threads) -> Plan

Batch norm sees x as channels-first (N, C, S) (NCHW, NCL) or channels-last (R, C) (NHWC, NLC, NC)
and takes one of two paths per view: a *single launch* per direction when a task can own whole
channels that stay in cache (``cf-single-launch``: a channel of long rows; ``cl-single-launch``:
a column tile of every row), else *two passes* (``cf-two-pass``, ``cl-two-pass``: statistics or
gradient sums, then the elementwise pass). Inference is the elementwise pass on either. Layer
norm (``ln-rows``) and group norm (``gn-blocks``) have one path each. :data:`PATHS` names the
kernels of each path and direction; ``docs/kernels.md`` tells when each earns its keep.

The work partitioning (``Plan.chunks``) depends on the shape only, never on the thread count:
every result is the same bits for any number of threads. ``threads`` only decides whether the
passes run in parallel (x of fewer than ``parallel_min_values`` values runs on one thread: a
parallel launch costs more than such passes, much more on a loaded machine). Every size limit is
in :data:`LIMITS`; the hardware budgets come from :mod:`.machine`. This module imports neither
numba nor the kernels: :func:`plan` and ``explain`` are cheap.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass, field

from . import machine

CHANNELS_FIRST = ("NCHW", "NCL")
CHANNELS_LAST = ("NHWC", "NLC", "NC")
LANES = 32  # long rows are summed as rows of this many float64 lanes (compiled into the kernels)


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: a cheap plan-cache key
class Limits:
    """Every size the plans are made from. Tests shrink them (:func:`limits`) so that tiny
    tensors take every path; the hardware budgets default to :mod:`.machine`'s."""

    short_row: int = 512  # channels-first rows shorter than this are summed column-wise
    segment: int = 16384  # long rows are cut into pieces of at most this many values
    min_tasks: int = 32  # tasks per reduction, whatever C is (balance a few threads)
    max_tasks: int = 256  # tasks per pass over short rows (each allocates its accumulators)
    min_single_launch_channels: int = 4  # channels-first single launch: one task per channel
    register_widths: tuple[int, ...] = (64, 128, 192, 256)  # lane rows kept in registers
    wide_row: int = 1024  # channels-last rows of other C are widened to >= this many lanes
    min_block_rows: int = 64  # channels-last row blocks (their (blocks, C) partials stay small)
    min_block_values: int = 8192
    max_blocks: int = 64
    tile_min_width: int = 64  # channels-last single launch: narrower tiles stride too much
    tile_min_tiles: int = 4  # ... and enough tiles for a few threads
    tile_align: int = 16  # tile widths are whole 64-byte lines of float32
    parallel_min_values: int = 1 << 17  # x with fewer values runs on one thread
    tile_bytes: int | None = None  # None: machine.tile_bytes()
    channel_bytes: int | None = None  # None: machine.channel_bytes()
    stream_bytes: int | None = None  # None: machine.stream_bytes()

    def budget(self, name: str) -> int:
        value = getattr(self, name)
        return getattr(machine, name)() if value is None else value


LIMITS = Limits()


@contextlib.contextmanager
def limits(**changes):
    """Plans made inside the block use :data:`LIMITS` with ``changes`` (for tests)."""
    global LIMITS
    saved = LIMITS
    LIMITS = dataclasses.replace(saved, **changes)
    try:
        yield LIMITS
    finally:
        LIMITS = saved


PATHS = {
    "cf-single-launch": {
        "train_forward": ("cf_train_forward",),
        "backward": ("cf_backward",),
        "eval_forward": ("cf_affine",),
        "eval_backward": ("cf_grad_sums", "cf_affine"),
    },
    "cf-two-pass": {
        "train_forward": ("cf_moments", "cf_affine"),
        "backward": ("cf_grad_sums", "cf_dx"),
        "eval_forward": ("cf_affine",),
        "eval_backward": ("cf_grad_sums", "cf_affine"),
    },
    "cl-single-launch": {
        "train_forward": ("cl_train_forward",),
        "backward": ("cl_backward",),
        "eval_forward": ("cl_affine",),
        "eval_backward": ("cl_grad_sums", "cl_affine"),
    },
    "cl-two-pass": {
        "train_forward": ("cl_moments", "cl_affine"),
        "backward": ("cl_grad_sums", "cl_dx"),
        "eval_forward": ("cl_affine",),
        "eval_backward": ("cl_grad_sums", "cl_affine"),
    },
    "ln-rows": {"forward": ("ln_forward",), "backward": ("ln_backward",)},
    "gn-blocks": {"forward": ("gn_forward",), "backward": ("gn_backward",)},
}


@dataclass(frozen=True)
class Plan:
    """How the kernels run one call (see the module docstring for the paths)."""

    norm: str  # "batch_norm" | "layer_norm" | "group_norm"
    path: str  # a key of PATHS
    view: tuple[int, ...]  # the kernels' view of x: (N, C, S), (R, C) or (M, D)
    channels_last: bool
    itemsize: int  # of the compute dtype (float16 is computed in float32)
    threads: int  # threads a parallel pass may use
    parallel: bool  # False: the passes are small and run on one thread
    stream: bool  # outputs big enough for non-temporal stores (used when aligned like x)
    chunks: dict = field(default_factory=dict)  # the fixed work partitioning
    reason: str = ""

    @property
    def kernels(self) -> dict[str, tuple[str, ...]]:
        """Direction ("train_forward", "backward", ...) -> the kernels it launches, in order."""
        return PATHS[self.path]

    def as_dict(self) -> dict:
        return {
            "norm": self.norm,
            "path": self.path,
            "view": list(self.view),
            "channels_last": self.channels_last,
            "threads": self.threads,
            "parallel": self.parallel,
            "stream": self.stream,
            "chunks": dict(self.chunks),
            "kernels": {k: list(v) for k, v in self.kernels.items()},
            "reason": self.reason,
        }


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _prod(values) -> int:
    n = 1
    for v in values:
        n *= int(v)
    return n


# --------------------------------------------------------------------------- batch norm


def bn_view(shape: tuple[int, ...], layout: str) -> tuple[tuple[int, ...], bool]:
    """(view, channels_last): (N, C, S) channels-first or (R, C) channels-last, with the two
    degenerate forms swapped to the one that vectorizes."""
    n = int(shape[0])
    if layout in CHANNELS_FIRST:
        c, s = int(shape[1]), _prod(shape[2:])
        if s == 1 and c > 1:
            return (n, c), True
        return (n, c, s), False
    if layout not in CHANNELS_LAST:
        raise ValueError(f"layout must be one of {CHANNELS_FIRST + CHANNELS_LAST}, got {layout!r}")
    c = int(shape[-1])
    rows = _prod(shape[:-1])
    if c == 1 and rows > 1:
        return (n, 1, rows // n if n else 0), False
    return (rows, c), True


def register_width(c: int, lim: Limits | None = None) -> int:
    """The narrowest register width that rows of c channels fill exactly, 0 if none."""
    lim = lim or LIMITS
    return next((w for w in lim.register_widths if w % c == 0), 0) if c > 0 else 0


def _row_blocks(rows: int, width: int, lim: Limits) -> int:
    by_size = _ceil_div(rows * width, lim.min_block_values)
    return max(1, min(rows // lim.min_block_rows, lim.max_blocks, by_size))


def _cl_tiles(rows: int, c: int, itemsize: int, lim: Limits) -> int:
    """Column tiles of the channels-last single launch (0: a tile of the minimum width over all
    rows does not fit the L2 budget). Width: the most channels that fit, at most C /
    tile_min_tiles so that a few threads share the work, in whole lines."""
    width = lim.budget("tile_bytes") // max(1, rows * itemsize)
    if width < lim.tile_min_width:
        return 0
    width = min(width, max(lim.tile_min_width, _ceil_div(c, lim.tile_min_tiles)))
    if width >= lim.tile_align:
        width -= width % lim.tile_align
    return _ceil_div(c, width)


def _cf_chunks(n: int, c: int, s: int, lim: Limits) -> dict:
    """Channels-first partitioning. Reductions: a channel's rows (and pieces of long rows) are
    dealt into ``groups`` consecutive ranges, its channels into ``channel_blocks``; one task per
    (group, block). Short rows are summed column-wise (lanes = the row), long ones as rows of
    ``lanes`` values. Elementwise passes: one task per (sample, block of ``row_blocks``
    channels, piece)."""
    short = s < lim.short_row
    pieces = 1 if short else _ceil_div(s, lim.segment)
    groups = max(1, min(n * pieces, _ceil_div(lim.min_tasks, max(c, 1))))
    return {
        "lanes": s if short else LANES,
        "registers": not short,
        "pieces": pieces,
        "groups": groups,
        "channel_blocks": max(1, min(c, lim.max_tasks // groups)),
        "row_blocks": max(1, min(c, lim.max_tasks // max(n, 1))),
    }


def _cl_chunks(rows: int, c: int, lim: Limits) -> dict:
    """Channels-last partitioning: rows of ``width`` = k·C lanes (a register width when C divides
    one, else >= wide_row lanes), cut into ``blocks`` of whole lane rows."""
    registers = register_width(c, lim)
    k = registers // c if registers else max(1, lim.wide_row // c)
    lane_rows = max(1, rows // k)
    blocks = max(1, min(_row_blocks(lane_rows, k * c, lim), lim.min_tasks))
    return {"width": k * c, "registers": bool(registers), "k": k, "blocks": blocks}


def bn_plan(shape, layout: str, itemsize: int, threads: int) -> Plan:
    lim = LIMITS
    view, cl = bn_view(tuple(shape), layout)
    size = _prod(view)
    common = dict(
        norm="batch_norm",
        view=view,
        channels_last=cl,
        itemsize=itemsize,
        threads=threads,
        parallel=threads > 1 and size >= lim.parallel_min_values,
        stream=size * itemsize >= lim.budget("stream_bytes"),
    )
    if cl:
        rows, c = view
        tiles = _cl_tiles(rows, c, itemsize, lim)
        chunks = _cl_chunks(rows, c, lim)  # the elementwise passes (inference) use them too
        if tiles:
            reason = f"a column tile of all {rows} rows fits half of L2"
            chunks = {"tiles": tiles, **chunks}
            return Plan(path="cl-single-launch", chunks=chunks, reason=reason, **common)
        lanes = "registers" if chunks["registers"] else "memory"
        reason = f"{rows} rows of {c} channels, as rows of {chunks['width']} lanes in {lanes}"
        return Plan(path="cl-two-pass", chunks=chunks, reason=reason, **common)
    n, c, s = view
    chunks = _cf_chunks(n, c, s, lim)
    channel = n * s * itemsize
    if s >= lim.short_row and c >= lim.min_single_launch_channels:
        if channel <= lim.budget("channel_bytes"):
            reason = f"rows of {s} values; a channel ({channel >> 10} KiB) stays in cache"
            return Plan(path="cf-single-launch", chunks=chunks, reason=reason, **common)
    if s < lim.short_row:
        reason = f"short rows ({s} < {lim.short_row} values), summed column-wise"
    elif c < lim.min_single_launch_channels:
        reason = f"{c} channels: too few tasks for a launch per channel"
    else:
        reason = f"a channel ({channel >> 10} KiB) does not stay in cache"
    return Plan(path="cf-two-pass", chunks=chunks, reason=reason, **common)


# --------------------------------------------------------------------------- layer/group norm


def ln_plan(rows: int, d: int, itemsize: int, threads: int) -> Plan:
    lim = LIMITS
    blocks = _row_blocks(rows, d, lim)
    return Plan(
        norm="layer_norm",
        path="ln-rows",
        view=(rows, d),
        channels_last=True,
        itemsize=itemsize,
        threads=threads,
        parallel=threads > 1 and rows * d >= lim.parallel_min_values,
        stream=rows * d * itemsize >= lim.budget("stream_bytes"),
        chunks={"blocks": blocks, "lanes": LANES},
        reason="a task sums each of its rows, then writes it from cache",
    )


def gn_plan(n: int, c: int, s: int, groups: int, itemsize: int, threads: int) -> Plan:
    lim = LIMITS
    return Plan(
        norm="group_norm",
        path="gn-blocks",
        view=(n, c, s),
        channels_last=False,
        itemsize=itemsize,
        threads=threads,
        parallel=threads > 1 and n * c * s >= lim.parallel_min_values,
        stream=n * c * s * itemsize >= lim.budget("stream_bytes"),
        chunks={"tasks": n * groups, "lanes": LANES},
        reason="a task sums its (sample, group) block, then writes it from cache",
    )


def plan(shape, layout: str, dtype, threads: int | None = None, norm: str = "batch_norm", *,
         num_groups: int | None = None) -> Plan:  # fmt: skip
    """The plan of a ``norm`` call on x of ``shape`` in ``layout`` and ``dtype`` with ``threads``
    threads (None: the cores this process may use). Layer norm: ``layout`` is ignored and
    ``shape`` is (M, D); group norm: ``num_groups`` is needed and ``layout`` channels-first."""
    import numpy as np

    itemsize = 4 if np.dtype(dtype).itemsize <= 4 else 8  # float16 is computed in float32
    if threads is None:
        from bnlab.backend import usable_cores

        threads = usable_cores()
    shape = tuple(int(s) for s in shape)
    return _cached(norm, shape, layout, itemsize, int(threads), num_groups, LIMITS)


@functools.lru_cache(maxsize=512)
def _cached(norm, shape, layout, itemsize, threads, num_groups, lim) -> Plan:
    """Plans are computed once per shape (``lim``, the limits in force, is part of the key)."""
    if norm == "batch_norm":
        return bn_plan(shape, layout, itemsize, threads)
    if norm == "layer_norm":
        rows, d = shape
        return ln_plan(rows, d, itemsize, threads)
    if norm == "group_norm":
        return gn_plan(shape[0], shape[1], _prod(shape[2:]), int(num_groups), itemsize, threads)
    raise ValueError(f"norm must be batch_norm, layer_norm or group_norm, got {norm!r}")
