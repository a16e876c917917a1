"""Shared checks of the reliability suite: "a clear error, and nothing changed".

``expect_clean_error(fn, exc, needles, state=[...])`` calls ``fn`` and asserts that it raised
``exc`` (a documented type) whose message contains every needle (the argument's name and what was
expected), and that every object in ``state`` is exactly as before: numpy arrays (values, dtype,
shape), bnlab/torch modules (every parameter and buffer, and the train/eval flag), files and
folders on disk (bytes and listing).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest


def snapshot(obj):
    """A deep, comparable copy of ``obj``'s observable state."""
    if isinstance(obj, np.ndarray):
        return ("array", obj.dtype.str, obj.shape, obj.tobytes())
    if isinstance(obj, Path):
        if obj.is_dir():
            return ("dir", {p.name: snapshot(p) for p in sorted(obj.iterdir())})
        return ("file", obj.read_bytes() if obj.exists() else None)
    if hasattr(obj, "state_dict") and hasattr(obj, "training"):
        return ("module", obj.training, {k: _tensor_bytes(v) for k, v in obj.state_dict().items()})
    raise TypeError(f"don't know how to snapshot {type(obj).__name__}")


def _tensor_bytes(v):
    if isinstance(v, np.ndarray):
        return (v.dtype.str, v.shape, v.tobytes())
    t = v.detach().cpu()  # torch tensor
    return (str(t.dtype), tuple(t.shape), t.numpy().tobytes())


def expect_clean_error(fn, exc, needles, state=()):
    """Assert ``fn()`` raises ``exc`` naming every needle, leaving every ``state`` object unchanged.

    ``needles``: strings (case-insensitive substrings) or compiled regexes, all required.
    Returns the exception for further checks.
    """
    before = [snapshot(s) for s in state]
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    for needle in [needles] if isinstance(needles, (str, re.Pattern)) else needles:
        found = (
            needle.search(msg) if isinstance(needle, re.Pattern) else needle.lower() in msg.lower()
        )
        assert found, f"message {msg!r} does not mention {needle!r}"
    for i, (obj, old) in enumerate(zip(state, before, strict=True)):
        assert snapshot(obj) == old, f"state object #{i} ({type(obj).__name__}) was modified"
    return info.value


def remount_read_only(point: Path) -> None:
    """Make a :func:`small_fs` mount read-only (after the test has put files on it)."""
    import subprocess  # noqa: PLC0415

    subprocess.run(["mount", "-o", "remount,ro", str(point)], check=True, capture_output=True)
