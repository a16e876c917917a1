"""Run folders: what a training run writes, owned by one process at a time.

Both trainers (:mod:`bnlab.train`, the NumPy engine, and :mod:`bnlab.torch.train`) write the same
folder::

    checkpoint.safetensors + checkpoint.json   the state after the last finished epoch
    metrics.json                               config, data provenance, one row per epoch
    report.md, loss.png, accuracy.png          written at the end

Rules, each checked before anything is changed:

* **One owner.** :meth:`RunFolder.claim` takes an exclusive ``flock`` on the folder itself (no
  lock file); a second process gets :class:`RunFolderBusy` at once. The operating system
  releases the lock when the owner exits or is killed, so a crashed run leaves nothing to clean.
* **Destructive flags act last.** ``overwrite=True`` deletes nothing up front: the new run's first
  checkpoint replaces the old files atomically, and the old run's report and figures are removed
  right after it (:meth:`RunFolder.wrote`). A run that fails before its first save leaves the old
  run exactly as it was.
* **Writable before work.** The folder is created if needed and a probe file is written and
  removed, so a read-only folder, a full disk or a path under a file fails before training.
* A folder that :meth:`claim` created and that received nothing is removed again on failure.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

from bnlab.errors import UsageError

RUN_FILES = (
    "checkpoint.safetensors",
    "checkpoint.json",
    "metrics.json",
    "report.md",
    "loss.png",
    "accuracy.png",
)
#: Set by a parent that holds the lock for the processes it starts (``bnlab train --nproc N``).
LOCK_HELD_ENV = "BNLAB_RUN_LOCK_HELD"
#: Settings a resumed run must share with its checkpoint, with the value older runs imply.
CONFIG_DEFAULTS = {"engine": "numpy"}


class RunFolderBusy(UsageError):
    """Another process owns the run folder."""


class RunFolder:
    """A claimed run folder (use :meth:`claim` as a context manager)."""

    def __init__(self, path: Path, created: bool, lock_fd: int | None, overwrite: bool):
        self.path = path
        self.created = created
        self._lock_fd = lock_fd
        self._previous_pending = overwrite
        self.wrote_anything = False

    # ------------------------------------------------------------------ claim / release

    @classmethod
    @contextlib.contextmanager
    def claim(cls, path, *, resume: bool = False, overwrite: bool = False, can_resume=True):
        """Validate the mode against the folder, create it, lock it, prove it writable.

        Raises UsageError (resume + overwrite; a path that is a file), FileExistsError (a
        checkpoint without --resume/--overwrite), FileNotFoundError (nothing to resume),
        RunFolderBusy, or OSError (not writable, disk full).
        """
        path = Path(path)
        check_mode(path, resume, overwrite, can_resume)
        created = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise UsageError(f"{path} exists and is not a folder: give --out a folder") from None
        run = cls(path, created, _lock(path), overwrite)  # a busy folder is left as it is
        try:
            check_mode(path, resume, overwrite, can_resume)  # again, now that nobody else can
            probe_writable(path)
            yield run
        finally:
            if created and not run.wrote_anything:
                _remove_if_empty(path)  # still locked: nobody else can be using it
            run.release()

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None

    # ------------------------------------------------------------------ writes

    def adopt_files(self) -> None:
        """Count run files that other processes (this owner's workers) wrote as written."""
        self.wrote_anything = self.wrote_anything or any(
            (self.path / name).exists() for name in RUN_FILES
        )

    def wrote(self) -> None:
        """Call after every save: the first one retires the previous run's leftovers."""
        self.wrote_anything = True
        if self._previous_pending:
            self._previous_pending = False
            for name in ("report.md", "loss.png", "accuracy.png"):
                (self.path / name).unlink(missing_ok=True)


def check_mode(path: Path, resume: bool, overwrite: bool, can_resume: bool = True) -> None:
    """The --resume / --overwrite rules against what the folder holds (nothing is changed);
    ``can_resume``: whether the command offers --resume (for the error's advice)."""
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    if path.exists() and not path.is_dir():
        raise UsageError(f"{path} exists and is not a folder: give --out a folder")
    has_checkpoint = (path / "checkpoint.safetensors").exists()
    if resume and not has_checkpoint:
        raise FileNotFoundError(f"nothing to resume: {path} holds no checkpoint.safetensors")
    if has_checkpoint and not (resume or overwrite):
        resume_hint = "--resume to continue it, " if can_resume else ""
        raise FileExistsError(
            f"{path} already holds a checkpoint; pass {resume_hint}--overwrite to replace it, "
            "or choose a new --out"
        )


def _lock(path: Path) -> int | None:
    """An exclusive non-blocking flock on the folder; None when a parent process holds it for us
    (LOCK_HELD_ENV names this folder)."""
    if os.environ.get(LOCK_HELD_ENV) == str(path.resolve()):
        return None
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunFolderBusy(
                f"{path} is in use by another bnlab process; wait for it to finish or choose "
                "another --out"
            ) from None
        raise
    return fd


def probe_writable(path: Path) -> None:
    """Write, fsync and remove a small file in ``path``: OSError (read-only, full, no
    permission) before any work is done."""
    probe = path / f".bnlab-write-test-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        msg = f"cannot write in the run folder ({err.strerror})"
        raise OSError(err.errno, msg, str(path)) from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def _remove_if_empty(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()


def config_mismatch(mine: dict, stored: dict) -> list[str]:
    """Settings (other than ``epochs``) in which ``mine`` differs from a checkpoint's config."""
    return [k for k in mine if k != "epochs" and stored.get(k, CONFIG_DEFAULTS.get(k)) != mine[k]]


def resume_error(path: Path, mine: dict, stored: dict) -> str | None:
    """Why a run with config ``mine`` cannot resume the checkpoint ``stored``, or None."""
    bad = config_mismatch(mine, stored)
    if not bad:
        return None
    if "engine" in bad:
        was = stored.get("engine", CONFIG_DEFAULTS["engine"])
        return (
            f"cannot resume {path}: it was trained with --engine {was}, not --engine "
            f"{mine['engine']}; resume it with --engine {was}"
        )
    theirs = {k: stored.get(k, CONFIG_DEFAULTS.get(k)) for k in bad}
    return (
        f"cannot resume {path}: these settings differ from the checkpoint's: {bad} "
        f"(stored: {theirs}); resume with the stored settings, or start again with --overwrite"
    )


def data_mismatch(path: Path, stored: dict | None, current: dict) -> str | None:
    """Why a resumed run cannot continue on ``current`` data (metrics.json's "data" record) when
    it was trained on ``stored``, or None. Files are compared by content (sha256), so the same
    files in another folder are fine; runs recorded before the data record are not checked."""
    if not stored or not stored.get("files"):
        return None
    old = {name: f.get("sha256") for name, f in stored["files"].items()}
    new = {name: f.get("sha256") for name, f in current.get("files", {}).items()}
    if old != new:
        return (
            f"cannot resume {path}: it was trained on other data files (recorded folder "
            f"{stored.get('folder')}, files {sorted(old)}); resume with the same data (--data)"
        )
    return None
