"""Helpers of the kernel tests: plans that split tiny tensors many ways, arrays at a chosen offset
within a cache line."""

from __future__ import annotations

import numpy as np

from bnlab.kernels import paths

LINE = 64

#: Limits under which tensors of a few hundred values are cut into many chunks (row pieces,
#: groups, channel blocks, row blocks, column tiles) and every pass runs in parallel.
TINY = dict(
    short_row=100,
    segment=40,
    min_tasks=7,
    max_tasks=4,
    min_block_rows=3,
    min_block_values=16,
    wide_row=40,
    tile_min_width=1,
    tile_min_tiles=20,
    tile_align=1,
    min_single_launch_channels=1,
    parallel_min_values=0,
)


def tiny_limits(single_launch: bool, **more):
    """:data:`TINY`, with the single-launch paths forced on (``single_launch``) or off."""
    budget = (1 << 30) if single_launch else 0
    return paths.limits(**{**TINY, "tile_bytes": budget, "channel_bytes": budget, **more})


def at_offset(values: np.ndarray, offset_bytes: int) -> np.ndarray:
    """A copy of ``values`` whose data starts ``offset_bytes`` past a cache-line boundary."""
    raw = np.empty(values.nbytes + 2 * LINE, np.uint8)
    start = (offset_bytes - raw.ctypes.data) % LINE
    out = raw[start : start + values.nbytes].view(values.dtype).reshape(values.shape)
    out[...] = values
    return out
