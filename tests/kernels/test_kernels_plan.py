"""The plan table (which path and kernels a call runs), explain, the machine facts it is sized
by, and that numba's disk cache serves the kernels to a new process."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from bnlab.kernels import explain, machine, paths

# The budgets of a 1 MiB-L2 / 32 MiB-L3 machine: the table below does not depend on the host.
BUDGETS = dict(tile_bytes=512 << 10, channel_bytes=2 << 20, stream_bytes=16 << 20)


@pytest.mark.parametrize(
    ("shape", "layout", "path", "chunks"),
    [
        ((64, 64, 56, 56), "NCHW", "cf-single-launch", {"lanes": 32}),  # 784 KiB channels
        ((256, 6, 28, 28), "NCHW", "cf-single-launch", {}),  # LeNet's first BN
        ((512, 64, 56, 56), "NCHW", "cf-two-pass", {"lanes": 32}),  # 6 MiB channels
        ((64, 3, 56, 56), "NCHW", "cf-two-pass", {}),  # too few channels for a task each
        ((32, 256, 14, 14), "NCHW", "cf-two-pass", {"lanes": 196, "registers": False}),
        ((8, 2048, 7, 7), "NCHW", "cf-two-pass", {"lanes": 49}),
        ((256, 4096), "NC", "cl-single-launch", {"tiles": 8}),  # 512-channel tiles in L2
        ((256, 120), "NC", "cl-single-launch", {"tiles": 2}),  # few channels: still split
        ((8, 7, 7, 2048), "NHWC", "cl-single-launch", {"tiles": 7}),
        ((64, 56, 56, 64), "NHWC", "cl-two-pass", {"width": 64, "registers": True}),
        ((64, 28, 28, 96), "NHWC", "cl-two-pass", {"width": 192, "registers": True}),
        ((16, 28, 28, 512), "NHWC", "cl-two-pass", {"width": 1024, "registers": False}),
        ((2, 50, 1), "NLC", "cf-two-pass", {}),  # C = 1 channels-last runs as (N, 1, S)
        ((6, 9, 1, 1), "NCHW", "cl-single-launch", {}),  # S = 1 channels-first runs as (N, C)
    ],
)
def test_the_plan_picks_the_path_of_the_table(shape, layout, path, chunks):
    with paths.limits(**BUDGETS):
        p = paths.plan(shape, layout, np.float32, threads=2)
    assert p.path == path, p.reason
    for key, value in chunks.items():
        assert p.chunks[key] == value
    assert set(p.kernels) == {"train_forward", "backward", "eval_forward", "eval_backward"}


def test_plans_do_not_depend_on_the_thread_count_except_for_running_in_parallel():
    with paths.limits(**BUDGETS):
        for shape, layout in (((64, 64, 56, 56), "NCHW"), ((64, 56, 56, 64), "NHWC")):
            one, many = (paths.plan(shape, layout, np.float32, t) for t in (1, 64))
            assert (one.path, one.chunks, one.view) == (many.path, many.chunks, many.view)
            assert many.parallel and not one.parallel
        assert not paths.plan((4, 5), "NC", np.float32, 64).parallel  # too small to launch


def test_explain_says_what_runs_and_why():
    x = np.zeros((64, 64, 56, 56), np.float32)
    with paths.limits(**BUDGETS):
        e = explain(x, "NCHW", backend="numba")
    text = str(e)
    assert "numba kernels" in text and "cf-single-launch" in text and "cf_backward" in text
    d = e.as_dict()
    assert d["plan"]["path"] == "cf-single-launch" and d["kernels"]["train_forward"] == [
        "cf_train_forward"
    ]
    assert explain(x, "NCHW", backend="numpy").plan is None
    half = explain(x.astype(np.float16), "NCHW", backend="numba")
    assert any("float16" in s for s in half.staging)
    ln = explain(np.zeros((8, 1024)), "NC", norm="layer_norm", backend="numba")
    assert ln.plan.path == "ln-rows" and ln.plan.view == (8, 1024)
    gn = explain(np.zeros((4, 8, 3, 3)), "NHWC", norm="group_norm", num_groups=2)
    assert gn.backend == "numpy" and "channels-last" in gn.reason
    inference = explain(x, "NCHW", training=False, backend="numba")
    assert list(inference.kernels) == ["eval_forward", "eval_backward"]


def test_machine_facts_come_from_the_os(tmp_path):
    for index, (level, kind, size) in enumerate(
        [
            (1, "Data", "48K"),
            (1, "Instruction", "32K"),
            (2, "Unified", "2048K"),
            (3, "Unified", "96M"),
        ]  # fmt: skip
    ):
        d = tmp_path / f"index{index}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    assert machine._sys_caches(tmp_path) == {1: 48 << 10, 2: 2 << 20, 3: 96 << 20}
    assert machine._sys_caches(tmp_path / "missing") == {}
    facts = machine.describe()
    assert facts["tile_bytes"] == machine.cache_bytes(2) // 2 > 0
    assert facts["stream_bytes"] >= 4 * machine.cache_bytes(2)


def test_a_new_process_loads_the_kernels_from_the_disk_cache():
    """Run a forward+backward on each path in a subprocess (compiling anything missing), then in
    a second one: every kernel it runs must come from numba's disk cache (a closure over a jitted
    function, or a changed key, would compile again in every process)."""
    code = textwrap.dedent("""
        import json, numpy as np
        from bnlab.functional import batch_norm_backward, batch_norm_forward
        from bnlab.functional import layer_norm_backward, layer_norm_forward
        from bnlab.kernels import bn_cf, bn_cl, group_norm, layer_norm
        rng = np.random.default_rng(0)
        for shape, layout in (((4, 8, 32, 32), "NCHW"), ((4, 8, 5, 5), "NCHW"),
                              ((4, 5, 5, 64), "NHWC"), ((64, 300), "NC"), ((4000, 80), "NC")):
            x = rng.standard_normal(shape).astype(np.float32)
            for training in (True, False):
                c = x.shape[-1] if layout != "NCHW" else x.shape[1]
                y, cache = batch_norm_forward(x, None, None, training=training, layout=layout,
                                              running_mean=np.zeros(c, np.float32),
                                              running_var=np.ones(c, np.float32), backend="numba")
                batch_norm_backward(x, cache)
        layer_norm_backward(x, layer_norm_forward(x, 80, backend="numba")[1])
        kernels = [bn_cf.cf_train_forward, bn_cf.cf_backward, bn_cf.cf_affine, bn_cf.cf_dx,
                   *bn_cf.reductions(0), *bn_cf.reductions(32), bn_cl.cl_train_forward,
                   bn_cl.cl_backward, *bn_cl.two_pass(64), *bn_cl.two_pass(0),
                   layer_norm.ln_forward_rows, layer_norm.ln_backward_rows]
        misses = {k.__name__: sum(d.stats.cache_misses.values())
                  for k in kernels for d in (k.parallel, k.serial)}
        print(json.dumps(misses))
    """)
    run = [sys.executable, "-c", code]
    subprocess.run(run, capture_output=True, text=True, check=True)  # compile what is missing
    out = subprocess.run(run, capture_output=True, text=True, check=True)
    misses = {k: v for k, v in __import__("json").loads(out.stdout).items() if v}
    assert not misses, f"compiled again in a new process: {misses}"
