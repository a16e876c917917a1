"""Every ``bnlab`` subcommand x a corpus of hostile arguments: never a traceback, documented exits.

For each subcommand a base command line that works and is quick, then every option in turn takes
each value of its kind's hostile corpus (missing / folder / FIFO / symlink-loop / empty / garbage /
truncated / NaN-filled input files, output paths in missing folders, on a read-only file system or
under a file, negative / zero / huge / non-numeric / NaN / Inf numbers, unknown choices). A case
passes when the command ends with a documented status (0 success, 1 a negative verdict, 2 a usage
error whose last stderr line is ``bnlab CMD: error: ...``), prints no traceback and does not hang.
Status 3 (internal error) is a failure: it means a bug.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bnlab.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from train_helpers import single_thread, write_fake_fashion_mnist  # noqa: E402

FAMILY = "CLI fuzz: every subcommand x hostile arguments"
CASE_TIMEOUT_S = 120

INTS = ["-1", "0", "abc", "1.5", "nan", "1e3", "", "-0", "99999999999999999999"]
FLOATS = ["nan", "inf", "-inf", "1e400", "-1", "0", "abc", "", "1e-320", "1e38"]
IN_PATHS = [
    "empty-string", "missing", "folder", "symlink-loop", "fifo", "empty-file", "garbage",
    "text", "truncated-checkpoint", "dev-null", "long-name", "pickle.npy", "nan.npy",
    "wrong-shape.npy", "int8.npy",
]  # fmt: skip
OUT_PATHS = [
    "empty-string", "missing-folder", "read-only", "is-folder", "under-a-file", "root",
    "long-name",
]  # fmt: skip
DIR_OUT = [*OUT_PATHS, "symlink-loop"]


# --------------------------------------------------------------------------- the workspace


def _make_in(ws: Path) -> dict[str, str]:
    (ws / "folder").mkdir()
    (ws / "loop1").symlink_to(ws / "loop2")
    (ws / "loop2").symlink_to(ws / "loop1")
    os.mkfifo(ws / "fifo")
    (ws / "empty-file").write_bytes(b"")
    (ws / "garbage").write_bytes(np.random.default_rng(0).bytes(4096))
    (ws / "text").write_text("hello\n")
    ckpt = (ws / "run" / "checkpoint.safetensors").read_bytes()
    (ws / "truncated.safetensors").write_bytes(ckpt[: len(ckpt) // 2])
    np.save(ws / "pickle.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(ws / "nan.npy", np.full((2, 1, 28, 28), np.nan, np.float32))
    np.save(ws / "wrong-shape.npy", np.zeros((3, 5), np.float32))
    np.save(ws / "int8.npy", np.zeros((2, 1, 28, 28), np.int8))
    return {
        "empty-string": "",
        "missing": str(ws / "missing"),
        "folder": str(ws / "folder"),
        "symlink-loop": str(ws / "loop1"),
        "fifo": str(ws / "fifo"),
        "empty-file": str(ws / "empty-file"),
        "garbage": str(ws / "garbage"),
        "text": str(ws / "text"),
        "truncated-checkpoint": str(ws / "truncated.safetensors"),
        "dev-null": "/dev/null",
        "long-name": str(ws / ("x" * 300)),
        "pickle.npy": str(ws / "pickle.npy"),
        "nan.npy": str(ws / "nan.npy"),
        "wrong-shape.npy": str(ws / "wrong-shape.npy"),
        "int8.npy": str(ws / "int8.npy"),
    }


def _make_out(ws: Path, read_only: Path) -> dict[str, str]:
    (ws / "a-file").write_text("x")
    return {
        "empty-string": "",
        "missing-folder": str(ws / "no" / "such" / "folder" / "out.json"),
        "read-only": str(read_only / "out.json"),
        "is-folder": str(ws / "folder"),
        "under-a-file": str(ws / "a-file" / "out.json"),
        "root": "/",
        "long-name": str(ws / ("y" * 300)),
        "symlink-loop": str(ws / "loop1"),
    }


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    data = write_fake_fashion_mnist(root / "data", n_train=256, n_test=64)
    with single_thread():
        for model, name in (("lenet-bn", "run"), ("lenet", "nobn")):
            argv = ["train", "--model", model, "--epochs", "1", "--batch-size", "64"]
            argv += ["--data", str(data), "--out", str(root / name), "--no-progress"]
            assert main(argv) == EXIT_OK
    ro = root / "ro"
    ro.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,ro", "tmpfs", str(ro)])
    if mounted.returncode != 0 and os.environ.get("CI") == "true":
        pytest.fail("CI=true but a read-only tmpfs cannot be mounted for the fuzz corpus")
    from bnlab.checkpoint import load_checkpoint
    from bnlab.io import save_safetensors

    state = load_checkpoint(root / "run").model_state
    save_safetensors(root / "lenet-bn.safetensors", state)
    np.save(root / "images.npy", np.random.default_rng(0).random((2, 1, 28, 28), np.float32))
    env = {"data": str(data), "root": root, "in": _make_in(root), "out": _make_out(root, ro)}
    yield env
    if mounted.returncode == 0:
        subprocess.run(["umount", "-l", str(ro)])


# --------------------------------------------------------------------------- the commands


def _fresh(ws, suffix=""):
    _fresh.n = getattr(_fresh, "n", 0) + 1
    return str(ws["root"] / f"fresh{_fresh.n}{suffix}")


def _commands(ws) -> dict:
    """command -> (base argv, {option: corpus}); a corpus is a list of literal values or of
    workspace path names."""
    d, run, root = ws["data"], str(ws["root"] / "run"), ws["root"]
    small_ints = [v for v in INTS if v != "99999999999999999999"]  # a huge count is a long run
    return {
        "train": (
            lambda: ["--out", _fresh(ws), "--data", d, "--epochs", "1", "--batch-size", "64",
                     "--train-limit", "130", "--test-limit", "20", "--no-progress"],
            {"--epochs": small_ints, "--batch-size": INTS, "--lr": FLOATS, "--momentum": FLOATS,
             "--weight-decay": FLOATS, "--seed": INTS, "--train-limit": INTS,
             "--test-limit": INTS, "--threads": INTS, "--nproc": small_ints,
             "--model": ["resnet", ""], "--backend": ["cuda", ""], "--engine": ["jax"],
             "--out": DIR_OUT, "--data": IN_PATHS},
        ),
        "evaluate": (
            lambda: ["--checkpoint", run, "--data", d, "--batch-size", "50"],
            {"--checkpoint": IN_PATHS, "--data": IN_PATHS, "--batch-size": INTS},
        ),
        "diagnose": (
            lambda: ["--checkpoint", run, "--data", d, "--batches", "2", "--batch-size", "16"],
            {"--checkpoint": [*IN_PATHS, str(root / "nobn")], "--data": IN_PATHS,
             "--split": ["valid"], "--inputs": IN_PATHS, "--batch-size": INTS,
             "--batches": small_ints, "--seed": INTS, "--shift": FLOATS, "--scale": FLOATS,
             "--json": OUT_PATHS, "--plot": OUT_PATHS},
        ),
        "recalibrate": (
            lambda: ["--checkpoint", run, "--out", _fresh(ws), "--data", d, "--batches", "2"],
            {"--checkpoint": [*IN_PATHS, str(root / "nobn")], "--out": DIR_OUT,
             "--data": IN_PATHS, "--batch-size": INTS, "--batches": small_ints,
             "--method": ["median"]},
        ),
        "check": (
            lambda: ["--no-torch", "--no-numba"],
            {"--seed": [v for v in INTS if v != "99999999999999999999"]},
        ),
        "experiment": (
            lambda: ["bn-vs-none", "--tiny", "--seeds", "1", "--out", _fresh(ws), "--no-progress"],
            {"NAME": ["nope", "", "../etc"], "--seeds": small_ints, "--out": DIR_OUT,
             "--report": OUT_PATHS},
        ),
        "fold": (
            lambda: ["--weights", str(root / "lenet-bn.safetensors"),
                     "--out", _fresh(ws, ".safetensors")],
            {"--weights": [*IN_PATHS, run], "--out": OUT_PATHS, "--calibration": IN_PATHS,
             "--certificate": OUT_PATHS},
        ),
        "infer": (
            lambda: ["--weights", run, "--input", str(root / "images.npy")],
            {"--weights": IN_PATHS, "--input": IN_PATHS, "--topk": INTS, "--labels": IN_PATHS},
        ),
    }  # fmt: skip


def _value(ws, corpus_value: str) -> str:
    if corpus_value in ws["in"] and corpus_value not in FLOATS + INTS:
        return ws["in"][corpus_value]
    return corpus_value


def _cases():
    """(id, command, option, corpus value): enumerated without a workspace (for ids)."""
    fake = {"data": "", "root": Path("/nonexistent"), "in": {}, "out": {}}
    for cmd, (_, options) in _commands(fake).items():
        for option, corpus in options.items():
            for value in corpus:
                yield pytest.param(cmd, option, value, id=f"{cmd}-{option.lstrip('-')}-{value}")


CASES = list(_cases())


def _argv(ws, cmd, option, value):
    base_fn, options = _commands(ws)[cmd]
    base = base_fn()
    table = ws["out"] if options[option] in (OUT_PATHS, DIR_OUT) else ws["in"]
    concrete = table.get(value, value)
    if option == "NAME":
        return [cmd, concrete, *base[1:]]
    if option in base:
        i = base.index(option)
        return [cmd, *base[:i], option, concrete, *base[i + 2 :]]
    return [cmd, *base, option, concrete]


# --------------------------------------------------------------------------- the harness


class _Hang(BaseException):
    """Raised by the alarm: not an Exception, so the CLI cannot turn it into an exit status."""


@contextlib.contextmanager
def _deadline(seconds: int):
    def fire(signum, frame):
        raise _Hang(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(autouse=True)
def _restore_global_state():
    """train sets the backend and thread counts of this process: put them back after a case."""
    import bnlab.backend as backend
    from bnlab.nn.threads import get_num_threads, set_blas_threads

    before = dict(backend._state)
    numba_threads, blas = get_num_threads()
    yield
    backend._state.update(before)
    if numba_threads is not None:
        import numba

        numba.set_num_threads(numba_threads)
    if blas is not None:
        set_blas_threads(blas)


def run_case(argv, capsys) -> tuple[int, str, str]:
    with _deadline(CASE_TIMEOUT_S), single_thread(), np.errstate(all="ignore"):
        code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_clean(argv, code, out, err):
    cmd = argv[0]
    text = out + err
    assert "Traceback" not in text, f"{argv}: traceback\n{text[-2000:]}"
    assert code in (EXIT_OK, EXIT_FAILED, EXIT_USAGE), f"{argv}: exit {code}\n{err[-2000:]}"
    if code == EXIT_USAGE:
        last = err.strip().splitlines()[-1] if err.strip() else ""
        assert last.startswith(f"bnlab {cmd}: error: "), f"{argv}: last stderr line {last!r}"
        assert len(last) <= 800, f"{argv}: an error line of {len(last)} characters"


@pytest.mark.parametrize("cmd, option, value", CASES)
def test_hostile_argument(ws, capsys, cmd, option, value):
    argv = _argv(ws, cmd, option, value)
    code, out, err = run_case(argv, capsys)
    assert_clean(argv, code, out, err)


@pytest.mark.parametrize("cmd", ["train", "evaluate", "diagnose", "recalibrate", "fold", "infer"])
def test_base_command_lines_work(ws, capsys, cmd):
    """The base each case starts from is itself a working command line (else every mutation
    would only test the same early error)."""
    base_fn, _ = _commands(ws)[cmd]
    argv = [cmd, *base_fn()]
    code, out, err = run_case(argv, capsys)
    assert code in (EXIT_OK, EXIT_FAILED), f"{argv}: exit {code}\n{err}"


@pytest.mark.parametrize(
    "argv",
    [[], ["nope"], ["--version-please"], ["train"], ["train", "--out"], ["diagnose", "-x"]]
    + [
        [c, "--help"]
        for c in (
            "check",
            "train",
            "evaluate",
            "diagnose",
            "recalibrate",
            "experiment",
            "fold",
            "infer",
        )
    ],  # fmt: skip
    ids=lambda a: " ".join(a) or "no-arguments",
)
def test_malformed_command_lines(capsys, argv):
    code, out, err = run_case(argv, capsys)
    assert "Traceback" not in out + err
    assert code == (EXIT_OK if "--help" in argv else EXIT_USAGE), (argv, code, err)


@pytest.mark.parametrize("env_value", ["missing", "empty-file", "folder", "symlink-loop"])
def test_hostile_bnlab_data(ws, capsys, monkeypatch, env_value):
    monkeypatch.setenv("BNLAB_DATA", ws["in"][env_value])
    for argv in (
        ["evaluate", "--checkpoint", str(ws["root"] / "run")],
        ["train", "--out", _fresh(ws), "--epochs", "1", "--no-progress"],
    ):
        code, out, err = run_case(argv, capsys)
        assert_clean(argv, code, out, err)
        assert code == EXIT_USAGE and "$BNLAB_DATA" in err, err


@pytest.mark.parametrize(
    "argv",
    [
        ["evaluate", "--checkpoint", "IN:fifo"],
        ["train", "--out", "OUT:read-only", "--lr", "nan"],
        ["diagnose", "--checkpoint", "IN:garbage"],
        ["check", "--seed", "-1"],
        ["infer", "--weights", "IN:missing", "--input", "IN:nan.npy"],
    ],  # fmt: skip
    ids=["evaluate-fifo", "train-nan", "diagnose-garbage", "check-seed", "infer-missing"],
)
def test_the_installed_command_prints_no_traceback(ws, argv):
    """The same contract through the real entry point, in a process of its own."""
    concrete = [
        ws["in"][a[3:]] if a.startswith("IN:") else ws["out"][a[4:]] if a.startswith("OUT:") else a
        for a in argv
    ]
    done = subprocess.run(
        [sys.executable, "-m", "bnlab.cli", *concrete],
        capture_output=True, text=True, timeout=CASE_TIMEOUT_S, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert "Traceback" not in done.stdout + done.stderr, done.stderr
    assert done.returncode == EXIT_USAGE, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"bnlab {argv[0]}: error: ")
