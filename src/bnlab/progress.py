"""A small dependency-free progress bar on stderr.

    with Progress(total=235, desc="epoch 1/10") as bar:
        for batch in batches:
            ...
            bar.update(1, loss=loss)

Redraws at most every ``min_interval`` seconds with ``\\r`` on a terminal; when the stream is not
a terminal (logs, CI) it stays silent unless ``enabled=True`` is forced, in which case it prints
only the final state. It never touches stdout, so machine-readable output stays clean.
"""

from __future__ import annotations

import sys
import time


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class Progress:
    """Progress over ``total`` units. ``enabled=None``: on when ``stream`` is a terminal."""

    def __init__(
        self,
        total: int,
        desc: str = "",
        *,
        stream=None,
        enabled: bool | None = None,
        width: int = 30,
        min_interval: float = 0.1,
    ):
        if isinstance(total, bool) or not isinstance(total, int) or total < 0:
            raise ValueError(f"total must be an int >= 0, got {total!r}")
        self.total, self.desc, self.width = total, desc, int(width)
        self.stream = sys.stderr if stream is None else stream
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = self.interactive if enabled is None else bool(enabled)
        self.min_interval = float(min_interval)
        self.n = 0
        self.postfix: dict = {}
        self._start = time.perf_counter()
        self._last_draw = 0.0
        self._closed = False

    def update(self, n: int = 1, **postfix) -> None:
        """Advance by ``n`` units; keyword arguments are shown after the bar (e.g. loss=0.41)."""
        self.n = min(self.total, self.n + n)
        self.postfix.update(postfix)
        now = time.perf_counter()
        if (
            self.enabled
            and self.interactive
            and (now - self._last_draw >= self.min_interval or self.n == self.total)
        ):
            self._draw(now)

    def render(self, now: float | None = None) -> str:
        """The bar as one line of text (no carriage return)."""
        now = time.perf_counter() if now is None else now
        frac = self.n / self.total if self.total else 1.0
        filled = int(round(frac * self.width))
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = now - self._start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.n) / rate if rate > 0 else 0.0
        extra = " ".join(f"{k}={_fmt(v)}" for k, v in self.postfix.items())
        head = f"{self.desc} " if self.desc else ""
        return f"{head}[{bar}] {self.n}/{self.total} {elapsed:5.1f}s<{eta:5.1f}s {extra}".rstrip()

    def _draw(self, now: float) -> None:
        self._last_draw = now
        self.stream.write("\r" + self.render(now) + "\x1b[K")
        self.stream.flush()

    def close(self) -> None:
        """Finish the line (terminal) or print the final state once (forced, non-terminal)."""
        if self._closed:
            return
        self._closed = True
        if not self.enabled:
            return
        if self.interactive:
            self._draw(time.perf_counter())
            self.stream.write("\r\x1b[K")  # clear it: the caller prints its own summary line
        else:
            self.stream.write(self.render() + "\n")
        self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
