"""A dependency-free progress bar on stderr (tqdm is not a dependency of bnlab).

On a terminal it redraws one line; otherwise (CI logs, pipes) it prints a line every 10 %.
"""

from __future__ import annotations

import sys
import time


class Progress:
    """``with Progress(total, "init-scale seed 0") as bar: bar.update(1, loss=0.3)``."""

    def __init__(self, total: int, desc: str, *, enabled: bool = True, stream=None, width=28):
        self.total = max(int(total), 1)
        self.desc = desc
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.count = 0
        self._start = time.monotonic()
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_decile = -1

    def update(self, n: int = 1, **postfix) -> None:
        self.count = min(self.count + n, self.total)
        if not self.enabled:
            return
        frac = self.count / self.total
        decile = int(frac * 10)
        if not self._tty and decile == self._last_decile and self.count < self.total:
            return
        self._last_decile = decile
        filled = int(frac * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        extra = " ".join(f"{k}={_short(v)}" for k, v in postfix.items())
        elapsed = time.monotonic() - self._start
        line = f"{self.desc} [{bar}] {self.count}/{self.total} {elapsed:5.1f}s {extra}".rstrip()
        if self._tty:
            self.stream.write("\r" + line[:150].ljust(150))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._tty:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _short(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
