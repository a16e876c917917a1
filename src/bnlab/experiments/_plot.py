"""Matplotlib without global state: an Agg canvas per figure, PNG written atomically.

Using ``matplotlib.figure.Figure`` + ``FigureCanvasAgg`` directly (not ``pyplot``) means no
display backend is ever touched and figures are freed when they go out of scope.
"""

from __future__ import annotations

import io
from pathlib import Path

from bnlab.io import atomic_write_bytes

# One colour per normalization / variant, so every figure uses the same legend colours.
COLORS = {
    "bn": "tab:blue",
    "none": "tab:red",
    "ln": "tab:green",
    "gn": "tab:purple",
    "ghost": "tab:cyan",
    "renorm": "tab:orange",
}


def new_figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (6.4, 4.2)):
    """A fresh ``(fig, axes)``; ``axes`` is a 2-D array when nrows·ncols > 1."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=nrows * ncols == 1)
    return fig, axes


def save_png(fig, path: Path, dpi: int = 110) -> str:
    """Render ``fig`` to PNG and write it atomically; returns the file name."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path).name


def band(ax, x, mean, std, label: str, color=None, **kw) -> None:
    """Mean line with a ±std band (std may be None with one seed)."""
    import numpy as np  # noqa: PLC0415

    mean = np.asarray(mean, dtype=float)
    (line,) = ax.plot(x, mean, label=label, color=color, **kw)
    if std is not None:
        std = np.asarray(std, dtype=float)
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2, lw=0)
