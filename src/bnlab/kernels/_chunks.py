"""Fixed work partitioning: a pure function of the tensor's shape, never of the thread count.

Every reduction is split into the same chunks and its partial results are combined in the same
order whatever the number of threads, so 1, 2 or 64 threads give bit-identical results.

Channels-first (N, C, S): each (n, c) row of S values is cut into ``pieces`` segments of at most
``SEGMENT`` values; a channel's ``units`` (n, piece) are dealt into ``groups`` consecutive ranges,
one parallel task per (group, channel). Rows shorter than ``SHORT_ROW`` are not cut (one piece).

Channels-last (N, S, C) is seen as R = N·S rows of C values; the rows are cut into ``blocks``
consecutive ranges of at least ``MIN_BLOCK_ROWS`` rows (so the (blocks, C) float64 partials stay a
small fraction of x) and the channels into tiles of ``CHANNEL_TILE``; one parallel task per
(block, tile), vectorized across the channels of its tile.
"""

from __future__ import annotations

SEGMENT = 16384  # values per channels-first row segment (64 KiB of float32)
SHORT_ROW = 512  # channels-first rows shorter than this are summed column-wise (one task shift)
MIN_TASKS = 32  # enough independent tasks to balance a few threads, whatever C is
MAX_SHORT_TASKS = 256  # short-row tasks: enough to balance threads, few allocations
MAX_BLOCKS = 64  # channels-last row blocks: bounds the (blocks, C) partials
MIN_BLOCK_ROWS = 64  # partials are at most 3·8/(64·itemsize) of x: 9% for float32
MIN_BLOCK_VALUES = 8192  # a channels-last block is at least this many values (overhead)
CHANNEL_TILE = 512  # channels per channels-last task: its float64 accumulators stay in L1
WIDE_ROW = 1024  # channels-last elementwise passes view k rows as one row of >= this many values
FUSED_TILE_BYTES = 512 * 1024  # a single-launch task's column tile of one array stays in L2
FUSED_MIN_WIDTH = 64  # narrower column tiles stride through memory too much to pay
FUSED_MIN_TILES = 4  # enough tiles to keep a few threads busy when C allows it
FUSED_ALIGN = 16  # tile widths are whole 64-byte lines of float32
FUSED_CHANNEL_BYTES = 2 * 1024 * 1024  # channels-first: one channel of one array, cache-resident
FUSED_MIN_CHANNELS = 4  # channels-first single launch needs this many tasks (one per channel)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def row_pieces(s: int) -> int:
    """Segments per (n, c) row of s values."""
    return max(1, _ceil_div(s, SEGMENT))


def channel_groups(n: int, c: int, pieces: int) -> int:
    """How many consecutive ranges of a channel's n·pieces (row, piece) units its reduction is
    split into (never more than there are units: no group is empty)."""
    return max(1, min(n * pieces, _ceil_div(MIN_TASKS, max(c, 1))))


def short_channel_blocks(c: int, groups: int) -> int:
    """Channels-first short rows: channels per task are grouped into this many blocks, so a task
    allocates its column accumulators once for many channels (at most MAX_SHORT_TASKS tasks)."""
    return max(1, min(c, MAX_SHORT_TASKS // groups))


def short_row_blocks(n: int, c: int) -> int:
    """Channels-first short rows, elementwise passes: channels per sample are grouped into this
    many blocks, one task per (sample, block): N·blocks tasks, at most MAX_SHORT_TASKS (fewer
    when C is small), or N (one block per sample) when N itself is larger."""
    return max(1, min(c, MAX_SHORT_TASKS // max(n, 1)))


def row_blocks(rows: int, c: int) -> int:
    """How many consecutive row ranges a channels-last (rows, C) tensor is split into."""
    by_size = _ceil_div(rows * c, MIN_BLOCK_VALUES)
    return max(1, min(rows // MIN_BLOCK_ROWS, MAX_BLOCKS, by_size))


def wide_row_blocks(rows: int, width: int) -> int:
    """Row blocks of a widened channels-last view (k rows of C channels seen as one row of
    width = k·C lanes, at most WIDE_ROW): enough tasks for the threads (MIN_TASKS), no more (each
    block folds its k·C lane sums into C partials that are merged afterwards).

    A task reads whole widened rows, contiguous memory: its float64 accumulators (24 KiB at 1024
    lanes) still fit L1, and two tiles of half-rows made every task stride through memory, which
    the prefetchers follow badly (NHWC (64,56,56,64), 2 threads: moments 1.66 -> 1.40 ms,
    gradient sums 3.27 -> 2.70 ms)."""
    return max(1, min(row_blocks(rows, width), MIN_TASKS))


def channel_tiles(c: int) -> int:
    """How many tiles of at most CHANNEL_TILE channels a channels-last row is split into."""
    return max(1, _ceil_div(c, CHANNEL_TILE))


def fused_tiles(rows: int, c: int, itemsize: int) -> int:
    """Column tiles of the single-launch channels-last kernels (:mod:`._fused`), or 0 when a tile
    of FUSED_MIN_WIDTH channels over all rows would not fit FUSED_TILE_BYTES (too many rows: the
    two-pass kernels stream instead).

    Width = the most channels whose column over all rows fits the budget, but at most
    C / FUSED_MIN_TILES (rounded up) so small C still splits into several tasks; rounded down to
    whole cache lines (FUSED_ALIGN channels) so tasks do not share a line."""
    width = FUSED_TILE_BYTES // max(1, rows * itemsize)
    if width < FUSED_MIN_WIDTH:
        return 0
    width = min(width, max(FUSED_MIN_WIDTH, _ceil_div(c, FUSED_MIN_TILES)))
    if width >= FUSED_ALIGN:
        width -= width % FUSED_ALIGN
    return _ceil_div(c, width)


def fused_channels(n: int, c: int, s: int, itemsize: int) -> bool:
    """Whether a channels-first (N, C, S) tensor runs the single-launch per-channel kernels: long
    rows (short ones are summed column-wise by the streaming kernels), enough channels to share
    between threads, and a channel small enough to stay cached between its two reads."""
    return s >= SHORT_ROW and c >= FUSED_MIN_CHANNELS and n * s * itemsize <= FUSED_CHANNEL_BYTES
