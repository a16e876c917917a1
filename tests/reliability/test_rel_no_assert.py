"""Validation never relies on ``assert`` (it vanishes under ``python -O``)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import bnlab

FAMILY = "validation survives python -O"
SRC = Path(bnlab.__file__).parent


def test_no_assert_statement_in_the_library():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Assert):
                found.append(f"{path.relative_to(SRC.parent)}:{node.lineno}")
    assert not found, f"assert statements in library code (stripped by python -O): {found}"


OPTIMIZED_SCRIPT = r"""
import sys, tempfile, pathlib
import numpy as np
assert False is False  # (this line is stripped too: proves -O is active below)
if __debug__:
    sys.exit("not running under -O")
from bnlab import functional as F, nn
from bnlab.data import read_idx, batches
from bnlab.io import load_safetensors
from bnlab.errors import BNLabError
tmp = pathlib.Path(tempfile.mkdtemp())
(tmp / "bad.idx").write_bytes(b"\x00\x00\x07\x01\x00\x00\x00\x01\x00")
(tmp / "bad.safetensors").write_bytes(b"\xff" * 16)
x = np.ones((4, 3, 2, 2), np.float32)
cases = {
    "eps=0": lambda: F.batch_norm_forward(x, None, None, training=True, eps=0.0),
    "momentum=2": lambda: F.batch_norm_forward(x, None, None, training=True, momentum=2.0),
    "one value/channel": lambda: F.batch_norm_forward(x[:1, :, :1, :1], None, None, training=True),
    "channels": lambda: nn.BatchNorm2d(5)(x),
    "idx type code": lambda: read_idx(tmp / "bad.idx"),
    "safetensors": lambda: load_safetensors(tmp / "bad.safetensors"),
    "batch_size=0": lambda: batches(np.zeros((2, 2, 2), np.uint8), np.zeros(2, np.int64), 0),
}
missed = []
for name, fn in cases.items():
    try:
        fn()
    except (BNLabError, ValueError, TypeError):
        continue
    missed.append(name)
print("MISSED", missed)
sys.exit(1 if missed else 0)
"""


def test_bad_inputs_still_raise_under_python_O():
    proc = subprocess.run(
        [sys.executable, "-O", "-c", OPTIMIZED_SCRIPT], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "MISSED []" in proc.stdout
