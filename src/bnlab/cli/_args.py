"""argparse types shared by the subcommands: numbers and paths are checked while the command line
is parsed, so a bad value is an error naming its flag (exit 2) before any work starts."""

from __future__ import annotations

import argparse
import math
import os
import stat
from pathlib import Path


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def int_at_least(minimum: int):
    """An integer >= ``minimum``."""

    def parse(text: str) -> int:
        value = _int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


positive_int = int_at_least(1)
nonneg_int = int_at_least(0)


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def finite_float(text: str) -> float:
    """Any finite number."""
    return _float(text)


def float_above(bound: float, *, strict: bool = True):
    """A finite number > ``bound`` (``strict``) or >= it."""

    def parse(text: str) -> float:
        value = _float(text)
        if value < bound or (strict and value == bound):
            raise argparse.ArgumentTypeError(
                f"must be a finite number {'>' if strict else '>='} {bound:g}, got {text}"
            )
        return value

    return parse


positive_float = float_above(0.0)
nonneg_float = float_above(0.0, strict=False)


def input_file(text: str) -> Path:
    """An existing regular file (symlinks followed): not a folder, a FIFO or a device, which a
    reader would misread or block on."""
    path = Path(text)
    if not text:
        raise argparse.ArgumentTypeError("expected a file name, got an empty string")
    try:
        st = path.stat()
    except OSError as err:
        raise argparse.ArgumentTypeError(f"{text}: {err.strerror.lower()}") from None
    if stat.S_ISDIR(st.st_mode):
        raise argparse.ArgumentTypeError(f"{text} is a folder, expected a file")
    if not stat.S_ISREG(st.st_mode):
        raise argparse.ArgumentTypeError(f"{text} is not a regular file")
    if not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text}: permission denied")
    return path


def input_path(text: str) -> Path:
    """An existing file or folder (e.g. a run folder or a checkpoint): checked for existence and
    kind; what it must contain is the command's business."""
    if not text:
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    path = Path(text)
    try:
        st = path.stat()
    except OSError as err:
        raise argparse.ArgumentTypeError(f"{text}: {err.strerror.lower()}") from None
    if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise argparse.ArgumentTypeError(f"{text} is neither a file nor a folder")
    return path


def output_file(text: str) -> Path:
    """A file the command will write: its folder exists and is writable, and the path is not a
    folder. (Written atomically later: a failed run leaves any old file as it was.)"""
    if not text:
        raise argparse.ArgumentTypeError("expected a file name, got an empty string")
    try:
        return _output_file(Path(text), text)
    except OSError as err:
        raise argparse.ArgumentTypeError(f"{text}: {err.strerror.lower()}") from None


def _output_file(path: Path, text: str) -> Path:
    folder = path.parent
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder, expected a file name")
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: folder {folder} does not exist")
    if _read_only(folder):
        raise argparse.ArgumentTypeError(f"{text}: folder {folder} is on a read-only file system")
    if not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text}: folder {folder} is not writable")
    if len(path.name.encode()) > 255:
        raise argparse.ArgumentTypeError(f"file name too long ({len(path.name)} characters)")
    return path


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False
