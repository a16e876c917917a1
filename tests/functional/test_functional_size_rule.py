"""The size-aware default: below the measured break-even size the default backend runs the NumPy
reference (without importing numba), above it the kernels; a backend named explicitly (per call
or with set_backend) is always used; explain says which runs and why."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from fn_support import BACKENDS

from bnlab import backend as bk
from bnlab.functional import _dispatch, batch_norm_forward, layer_norm_forward
from bnlab.kernels import explain

needs_numba = pytest.mark.skipif("numba" not in BACKENDS, reason="numba not installed")
LIMIT = _dispatch.BREAK_EVEN[("batch_norm", "train")]


@pytest.fixture
def default_backend():
    """The backend switch as a fresh process has it (restored afterwards)."""
    saved = dict(bk._state)
    bk._state.update(backend=None, explicit=False)
    yield
    bk._state.update(saved)


@needs_numba
def test_small_inputs_run_the_reference_and_large_ones_the_kernels(default_backend):
    small = np.ones((2, max(1, LIMIT // 2 - 1)))
    large = np.random.default_rng(0).standard_normal((4, LIMIT))
    assert batch_norm_forward(small, None, None, training=True, layout="NC")[1].backend == "numpy"
    assert batch_norm_forward(large, None, None, training=True, layout="NC")[1].backend == "numba"
    assert "faster here" in explain(small, "NC").reason
    assert explain(large, "NC").backend == "numba" and explain(small, "NC").plan is None


@needs_numba
def test_a_backend_named_explicitly_is_used_whatever_the_size(default_backend):
    tiny = np.random.default_rng(1).standard_normal((3, 2))
    assert batch_norm_forward(tiny, None, None, training=True, layout="NC",
                              backend="numba")[1].backend == "numba"  # fmt: skip
    assert explain(tiny, "NC", backend="numba").reason == "backend 'numba' requested"
    bk.set_backend("numba")
    assert batch_norm_forward(tiny, None, None, training=True, layout="NC")[1].backend == "numba"
    big = np.random.default_rng(2).standard_normal((64, LIMIT))
    bk.set_backend("numpy")
    assert batch_norm_forward(big, None, None, training=True, layout="NC")[1].backend == "numpy"


def test_the_break_even_sizes_cover_every_norm_and_mode():
    for key in (("batch_norm", "train"), ("batch_norm", "eval"), ("layer_norm", "train"),
                ("group_norm", "train")):  # fmt: skip
        assert _dispatch.BREAK_EVEN[key] > 0


@needs_numba
def test_cs231n_sized_calls_in_a_fresh_process_never_import_numba():
    """Every public function at cs231n sizes (forward and backward) on the default backend: the
    reference runs, and numba is never imported (so the first call does not pay for it)."""
    code = textwrap.dedent("""
        import sys
        import numpy as np
        from bnlab import functional as F
        rng = np.random.default_rng(0)
        for shape, layout in (((4, 5), "NC"), ((20, 10), "NC"), ((2, 3, 4, 5), "NCHW")):
            x = rng.standard_normal(shape)
            c = shape[1]
            for training in (True, False):
                y, cache = F.batch_norm_forward(x, None, None, training=training, layout=layout,
                                                running_mean=np.zeros(c), running_var=np.ones(c))
                F.batch_norm_backward(x, cache)
            y, cache = F.batch_renorm_forward(x, None, None, training=True, layout=layout,
                                              running_mean=np.zeros(c), running_var=np.ones(c))
            F.batch_renorm_backward(x, cache)
            y, cache = F.ghost_batch_norm_forward(x, None, None, training=True, layout=layout,
                                                  virtual_batch_size=2)
            F.ghost_batch_norm_backward(x, cache)
            F.layer_norm_backward(x, F.layer_norm_forward(x, shape[-1])[1])
        x = rng.standard_normal((2, 4, 3, 3))
        F.group_norm_backward(x, F.group_norm_forward(x, 2)[1])
        F.instance_norm_backward(x, F.instance_norm_forward(x)[1])
        print("numba" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_importing_bnlab_and_explaining_never_imports_numba():
    code = "import sys, numpy as np, bnlab, bnlab.functional, bnlab.kernels as k\n" \
           "k.explain(np.zeros((64, 64, 56, 56), np.float32), backend='numba')\n" \
           "print('numba' in sys.modules)"  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


@needs_numba
def test_layer_norm_follows_the_same_rule(default_backend):
    limit = _dispatch.BREAK_EVEN[("layer_norm", "train")]
    assert type(layer_norm_forward(np.ones((2, 3)), 3)[1]).__name__ == "NormCache"
    big = np.random.default_rng(3).standard_normal((8, limit))
    assert type(layer_norm_forward(big, limit)[1]).__name__ == "NormKernelCache"
