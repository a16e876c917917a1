"""Atomic writes: old file intact on failure, no temp files left, durable mode bits."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import bnlab.io as bio


def test_write_bytes_text_json(tmp_path):
    bio.atomic_write_bytes(tmp_path / "b", b"\x00\x01")
    bio.atomic_write_text(tmp_path / "t", "héllo")
    bio.atomic_write_json(tmp_path / "j.json", {"a": [1, 2.5]})
    assert (tmp_path / "b").read_bytes() == b"\x00\x01"
    assert (tmp_path / "t").read_text("utf-8") == "héllo"
    assert json.loads((tmp_path / "j.json").read_text()) == {"a": [1, 2.5]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "j.json", "t"]


def test_json_refuses_nan_and_keeps_old_file(tmp_path):
    path = tmp_path / "m.json"
    path.write_text("old")
    with pytest.raises(ValueError):
        bio.atomic_write_json(path, {"loss": float("nan")})
    assert path.read_text() == "old" and len(list(tmp_path.iterdir())) == 1


def test_exception_mid_write_leaves_old_file_and_no_temp(tmp_path):
    path = tmp_path / "ckpt"
    path.write_bytes(b"old contents")
    with pytest.raises(RuntimeError, match="writer died"):
        with bio.atomic_open(path) as f:
            f.write(b"half of the new")
            raise RuntimeError("writer died")
    assert path.read_bytes() == b"old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_safetensors_writer_failure_keeps_old_file(tmp_path, monkeypatch, rng):
    path = tmp_path / "w.safetensors"
    bio.save_safetensors(path, {"a": np.arange(3.0)})
    before = path.read_bytes()
    real_replace = os.replace

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(bio.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        bio.save_safetensors(path, {"a": rng.standard_normal(1000)})
    monkeypatch.setattr(bio.os, "replace", real_replace)
    assert path.read_bytes() == before and len(list(tmp_path.iterdir())) == 1


def test_fsync_of_file_and_folder_happens_before_and_after_replace(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync-dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync-file")
        real_fsync(fd)

    def replace(a, b):
        events.append("replace")
        real_replace(a, b)

    monkeypatch.setattr(bio.os, "fsync", fsync)
    monkeypatch.setattr(bio.os, "replace", replace)
    bio.atomic_write_bytes(tmp_path / "x", b"data")
    assert events == ["fsync-file", "replace", "fsync-dir"]


def test_temp_file_is_in_the_same_folder(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace
    monkeypatch.setattr(bio.os, "replace", lambda a, b: (seen.append(a), real_replace(a, b)))
    bio.atomic_write_bytes(tmp_path / "x", b"1")
    assert os.path.dirname(seen[0]) == str(tmp_path)


def test_mode_bits_kept_on_overwrite(tmp_path):
    path = tmp_path / "x"
    bio.atomic_write_bytes(path, b"1")
    assert path.stat().st_mode & 0o777 == 0o644
    path.chmod(0o600)
    bio.atomic_write_bytes(path, b"2")
    assert path.stat().st_mode & 0o777 == 0o600 and path.read_bytes() == b"2"


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        with bio.atomic_open(tmp_path / "x", "a"):
            pass
    with pytest.raises(TypeError, match="text must be a str"):
        bio.atomic_write_text(tmp_path / "x", b"bytes")
    with pytest.raises(FileNotFoundError):
        bio.atomic_write_bytes(tmp_path / "no" / "dir" / "x", b"1")
