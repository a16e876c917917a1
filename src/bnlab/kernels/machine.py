"""The machine facts the kernels size their work by, read from the OS when first needed.

Every threshold that depends on the hardware is derived here, from the cache sizes the kernel
reports (``/sys/devices/system/cpu/cpu0/cache``, else ``os.sysconf``, else the defaults below),
so nothing in the kernels states a fact about one machine:

================== ================================= ============================================
constant           rule                              why
================== ================================= ============================================
``LINE``           64 bytes                          the non-temporal stores' unit
``TILE_BYTES``     half the per-core L2 cache        a single-launch column tile of one array
                                                     stays in L2 between its two reads
``CHANNEL_BYTES``  twice the per-core L2 cache       a channels-first channel is re-read from
                                                     L2/L3 by the task that summed it
``STREAM_BYTES``   half the last-level cache         outputs this big are written past the cache
                                                     (they would evict the inputs, and the next
                                                     layer reads them from memory anyway)
================== ================================= ============================================

This module imports neither numba nor NumPy: :mod:`.plan` (and ``explain``) read it without
loading any kernel.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

_CPU0_CACHE = Path("/sys/devices/system/cpu/cpu0/cache")
_DEFAULTS = {1: 32 << 10, 2: 1 << 20, 3: 32 << 20}  # used only when the OS reports nothing
_SYSCONF = {1: "SC_LEVEL1_DCACHE_SIZE", 2: "SC_LEVEL2_CACHE_SIZE", 3: "SC_LEVEL3_CACHE_SIZE"}


def _parse_size(text: str) -> int:
    """``"1024K"`` / ``"32M"`` / ``"4096"`` (as /sys writes it) in bytes."""
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    digits = text[:-1] if text[-1:] in "KMG" else text
    return int(digits) * scale


def _sys_caches(root: Path = _CPU0_CACHE) -> dict[int, int]:
    """{level: bytes} of the data/unified caches of cpu0 as /sys lists them ({} if it cannot)."""
    found = {}
    try:
        for index in sorted(root.glob("index*")):
            kind = (index / "type").read_text().strip()
            if kind in ("Data", "Unified"):
                found[int((index / "level").read_text())] = _parse_size(
                    (index / "size").read_text()
                )
    except (OSError, ValueError):
        return {}
    return found


@functools.cache
def cache_bytes(level: int) -> int:
    """Size in bytes of the level-``level`` data cache (1, 2 or 3) this process runs on."""
    size = _sys_caches().get(level, 0)
    if size <= 0 and hasattr(os, "sysconf"):
        try:
            size = int(os.sysconf(_SYSCONF[level]))
        except (ValueError, OSError):
            size = 0
    return size if size > 0 else _DEFAULTS[level]


LINE = 64  # the non-temporal store intrinsics are written for 64-byte lines (see _stream.py)


def tile_bytes() -> int:
    """Budget of one array's column tile in the channels-last single-launch kernels."""
    return cache_bytes(2) // 2


def channel_bytes() -> int:
    """Largest channels-first channel (of one array) the single-launch kernels take."""
    return 2 * cache_bytes(2)


def stream_bytes() -> int:
    """Outputs at least this big are written with non-temporal stores."""
    return max(cache_bytes(3) // 2, 4 * cache_bytes(2))


def describe() -> dict:
    """The detected facts and the thresholds derived from them (for ``explain`` and benchmarks)."""
    return {
        "l1_bytes": cache_bytes(1),
        "l2_bytes": cache_bytes(2),
        "l3_bytes": cache_bytes(3),
        "tile_bytes": tile_bytes(),
        "channel_bytes": channel_bytes(),
        "stream_bytes": stream_bytes(),
    }
