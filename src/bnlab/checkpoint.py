"""Training checkpoints: model + optimizer + epoch + RNG state, pickle-free and atomic.

A checkpoint is two files written atomically (temp file in the same folder, fsync, rename,
fsync folder — :mod:`bnlab.io`):

    NAME.safetensors   tensors "model.<state_dict key>" and "optim.<optimizer key>", and the full
                       metadata (JSON string under "bnlab") in the safetensors header
    NAME.json          the same metadata, human-readable, plus the sha256 of NAME.safetensors

The safetensors file is self-describing and self-checking: its metadata holds a sha256 of every
tensor (name, dtype, shape, bytes), verified on load, so a truncated or bit-flipped file is
refused with a clear error. It is the single source of truth: the two files are renamed into
place one after the other, so a crash in between can leave new weights next to the previous
sidecar; that pair still loads (the sidecar's sha256 of the weights file tells it is stale and a
warning says so), and the next save rewrites both. Nothing is unpickled.

Metadata: format, version, model name, epoch (completed epochs), config, optimizer
hyperparameters, RNG state (the data-order key: batches of epoch e are a pure function of
(seed, e), see :mod:`bnlab.data.batches`) and the metrics so far.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bnlab.errors import DataFormatError

FORMAT = "bnlab-checkpoint"
VERSION = 1
MODEL_PREFIX = "model."
OPTIM_PREFIX = "optim."


@dataclass
class Checkpoint:
    """A loaded checkpoint: state dicts and metadata (``meta["epoch"]`` epochs completed)."""

    model_state: dict[str, np.ndarray]
    optim_state: dict[str, np.ndarray]
    meta: dict = field(default_factory=dict)

    @property
    def model_name(self) -> str:
        return self.meta["model"]

    @property
    def epoch(self) -> int:
        return int(self.meta["epoch"])


def paths(path) -> tuple[Path, Path]:
    """(weights, sidecar) for a checkpoint given as NAME, NAME.safetensors, NAME.json or a run
    folder (which holds ``checkpoint.safetensors``)."""
    p = Path(path)
    if p.is_dir():
        p = p / "checkpoint"
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_suffix(".safetensors"), p.with_suffix(".json")


def existing_paths(path) -> tuple[Path, Path]:
    """:func:`paths` of a checkpoint that must exist; errors name the path as the user gave it.

    Raises:
        FileNotFoundError: nothing at ``path`` (or a folder without checkpoint.safetensors).
        DataFormatError: ``path`` is a file of another kind (e.g. ``model.pt``).
    """
    given = Path(path)
    weights, sidecar = paths(given)
    if weights.is_file():
        return weights, sidecar
    if given.is_dir():
        raise FileNotFoundError(f"{given}: not a run folder (no checkpoint.safetensors in it)")
    if not given.exists():
        what = "run folder or checkpoint" if given.suffix == "" else "file"
        raise FileNotFoundError(f"{given}: no such {what}")
    if not given.is_file():
        raise DataFormatError(f"{given}: not a regular file")
    if given.suffix == ".json":
        raise FileNotFoundError(f"{given}: the checkpoint's {weights.name} is missing")
    raise DataFormatError(
        f"{given}: not a bnlab checkpoint (give a run folder, NAME.safetensors or NAME.json "
        "written by bnlab train)"
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tensors_sha256(tensors: dict[str, np.ndarray]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        h.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def save_checkpoint(path, model, optimizer, *, model_name: str, epoch: int, extra=None) -> Path:
    """Write ``model`` and ``optimizer`` state after ``epoch`` completed epochs; returns the
    weights path. ``extra`` (JSON-serialisable dict) is stored in the metadata."""
    return save_state(
        path,
        model.state_dict(),
        optimizer.state_dict(),
        {"type": type(optimizer).__name__, **optimizer.hyperparameters()},
        model_name=model_name,
        epoch=epoch,
        extra=extra,
    )


def save_state(
    path, model_state: dict, optim_state: dict, optimizer: dict, *, model_name: str, epoch: int,
    extra=None,
) -> Path:  # fmt: skip
    """:func:`save_checkpoint` from plain state dicts (name -> ndarray) and the optimizer's
    description (``{"type": ..., hyper-parameters}``): for callers without bnlab objects (the
    torch engine, recalibration, a loaded :class:`Checkpoint` written elsewhere)."""
    from bnlab.io import atomic_write_json, save_safetensors

    weights, sidecar = paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    tensors = {MODEL_PREFIX + k: v for k, v in model_state.items()}
    tensors.update({OPTIM_PREFIX + k: v for k, v in optim_state.items()})
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model": model_name,
        "epoch": int(epoch),
        "optimizer": dict(optimizer),
        **(extra or {}),
        "tensors_sha256": tensors_sha256(tensors),
    }
    save_safetensors(weights, tensors, metadata={"bnlab": json.dumps(meta, sort_keys=True)})
    atomic_write_json(sidecar, {**meta, "weights": weights.name, "sha256": _sha256(weights)})
    return weights


def load_checkpoint(path, *, expect_model: str | None = None) -> Checkpoint:
    """Read and validate a checkpoint (see the module docstring for what is checked).

    Raises:
        FileNotFoundError: the weights file is missing (see :func:`existing_paths`).
        DataFormatError: not a bnlab checkpoint, or a truncated/corrupt one (including a tensor
            checksum mismatch). A stale sidecar only warns (StaleSidecarWarning).
        ValueError: ``expect_model`` is given and the checkpoint is of another model.
    """
    from bnlab.io import load_safetensors

    weights, sidecar = existing_paths(path)
    tensors, header = load_safetensors(weights)
    meta = _parse_meta(weights, header)
    if tensors_sha256(tensors) != meta.get("tensors_sha256"):
        raise DataFormatError(
            f"{weights}: tensor data does not match the sha256 checksum in its metadata "
            "(corrupt file)"
        )
    _check_sidecar(weights, sidecar)
    if expect_model is not None and meta["model"] != expect_model:
        raise ValueError(
            f"{weights} is a checkpoint of model {meta['model']!r}, expected {expect_model!r}"
        )
    model_state = {
        k[len(MODEL_PREFIX) :]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)
    }
    optim_state = {
        k[len(OPTIM_PREFIX) :]: v for k, v in tensors.items() if k.startswith(OPTIM_PREFIX)
    }
    stray = [k for k in tensors if not k.startswith((MODEL_PREFIX, OPTIM_PREFIX))]
    if stray:
        raise DataFormatError(f"{weights}: unexpected tensors {stray} in a bnlab checkpoint")
    return Checkpoint(model_state, optim_state, meta)


def _parse_meta(weights: Path, header: dict) -> dict:
    raw = header.get("bnlab")
    if raw is None:
        raise DataFormatError(f"{weights}: not a bnlab checkpoint (no 'bnlab' metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{weights}: corrupt checkpoint metadata: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataFormatError(f"{weights}: not a bnlab checkpoint (format {meta!r:.60})")
    if meta.get("version") != VERSION:
        raise DataFormatError(
            f"{weights}: checkpoint version {meta.get('version')!r}, this bnlab reads {VERSION}"
        )
    for key, kind in (("model", str), ("epoch", int)):
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise DataFormatError(f"{weights}: checkpoint metadata field {key!r} is missing/bad")
    return meta


def _check_sidecar(weights: Path, sidecar: Path) -> None:
    """The human-readable sidecar should describe these weights; when it does not (a crash
    between the two renames, or an edit), warn: the weights file's own metadata is used."""
    if not sidecar.exists():
        return
    try:
        side = json.loads(sidecar.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        side = None
    if not isinstance(side, dict) or side.get("sha256") != _sha256(weights):
        warnings.warn(
            f"{sidecar} does not describe {weights.name} (sha256 differs: stale or edited "
            "sidecar); using the metadata stored in the weights file",
            StaleSidecarWarning,
            stacklevel=3,
        )


class StaleSidecarWarning(UserWarning):
    """The JSON sidecar does not match the checkpoint weights it sits next to."""
