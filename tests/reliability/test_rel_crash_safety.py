"""Crash safety: a writer SIGKILLed at random points never leaves an unloadable checkpoint.

Each round starts a worker (crash_worker.py) that resumes from the files on disk and then saves
new steps in a tight loop; after a random delay the test SIGKILLs it, asserts it really died by
SIGKILL (a worker that crashed or exited on its own would prove nothing), then loads the files:
they must hold a complete, internally consistent save no older than the last verified one, and the
next round must resume from exactly that step.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

FAMILY = "crash safety (SIGKILL)"
WORKER = Path(__file__).with_name("crash_worker.py")
ROUNDS = 20
sys.path.insert(0, str(WORKER.parent))
import crash_worker  # noqa: E402


def _start(mode: str, folder: Path, *extra: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), mode, str(folder), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    if not line.startswith("ready "):
        proc.kill()
        raise AssertionError(f"worker did not start: {line!r} {proc.stderr.read()}")
    return proc, int(line.split()[1])


def _kill_rounds(mode: str, folder: Path, load) -> dict:
    rng = random.Random(20261126)
    verified, mid_write, saves_seen = -1, 0, 0
    for r in range(ROUNDS):
        proc, resumed = _start(mode, folder)
        assert resumed == verified, f"round {r}: resumed from {resumed}, expected {verified}"
        temps_before = {p.name for p in folder.iterdir() if p.name.endswith(".tmp")}
        proc.stdout.close()
        try:
            proc.wait(timeout=rng.uniform(0.01, 0.15))
        except subprocess.TimeoutExpired:
            pass
        proc.send_signal(signal.SIGKILL)
        err = proc.stderr.read()
        proc.stderr.close()
        assert proc.wait() == -signal.SIGKILL, f"round {r}: worker exited by itself: {err}"
        mid_write += bool(
            {p.name for p in folder.iterdir() if p.name.endswith(".tmp")} - temps_before
        )
        step = load(folder)  # raises if the files on disk are not a complete, consistent save
        assert step >= verified, f"round {r}: went back from step {verified} to {step}"
        saves_seen += step > verified
        verified = step
    return {"last_step": verified, "mid_write_kills": mid_write, "rounds_with_progress": saves_seen}


def _check_kill_rounds(tmp_path, mode):
    stats = _kill_rounds(mode, tmp_path, crash_worker.MODES[mode][0])
    print(f"{mode}: {stats}")
    assert stats["last_step"] > 0, "no save ever completed: the kills tested nothing"
    # the kills must land inside writes, or the test proves little (a temp file was left behind)
    assert stats["mid_write_kills"] >= 1, stats


def test_sigkill_while_saving_safetensors_never_loses_the_previous_save(tmp_path):
    _check_kill_rounds(tmp_path, "safetensors")


def test_sigkill_while_saving_checkpoints_never_loses_the_previous_save(tmp_path):
    pytest.importorskip("bnlab.checkpoint")
    _check_kill_rounds(tmp_path, "checkpoint")


def test_sigkill_between_weights_and_sidecar_keeps_a_loadable_checkpoint(tmp_path):
    pytest.importorskip("bnlab.checkpoint")
    proc = subprocess.run(
        [sys.executable, str(WORKER), "checkpoint", str(tmp_path), "--die-before-sidecar"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert crash_worker.ck_load(tmp_path) in (0, 1)
