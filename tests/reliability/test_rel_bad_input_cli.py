"""Bad command lines: exit status 2, a message naming the option and what was expected, and
nothing written (the output folder is not created or is left byte-identical)."""

from __future__ import annotations

import pytest
from reliability_helpers import snapshot

from bnlab.cli import main

FAMILY = "bad input: CLI"


def run_cli(argv, capsys) -> tuple[int, str]:
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse errors
        status = exc.code
    return status, capsys.readouterr().err


def _needs(command: str):
    pytest.importorskip(f"bnlab.cli.{command}")


TRAIN_CASES = [
    ("epochs-negative", ["--epochs", "-1"], ["--epochs", ">= 0"]),
    ("epochs-text", ["--epochs", "ten"], ["--epochs", "integer"]),
    ("batch-size-zero", ["--batch-size", "0"], ["--batch-size", ">= 1"]),
    ("batch-size-negative", ["--batch-size", "-256"], ["--batch-size"]),
    ("model-unknown", ["--model", "resnet50"], ["--model", "invalid choice"]),
    ("lr-zero", ["--lr", "0"], ["--lr", "> 0"]),
    ("lr-nan", ["--lr", "nan"], ["--lr"]),
    ("lr-inf", ["--lr", "inf"], ["--lr"]),
    ("momentum-negative", ["--momentum", "-0.9"], ["--momentum", ">= 0"]),
    ("seed-negative", ["--seed", "-3"], ["--seed"]),
    ("backend-unknown", ["--backend", "cuda"], ["--backend", "invalid choice"]),
]


@pytest.mark.parametrize("case", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_train_bad_values(tmp_path, capsys, case):
    _needs("train")
    _, args, needles = case
    out = tmp_path / "run"
    status, err = run_cli(["train", "--out", str(out), *args], capsys)
    assert status == 2, err
    for n in needles:
        assert n.lower() in err.lower(), err
    assert not out.exists(), "a refused command must not create its output folder"


def test_train_without_out(capsys):
    _needs("train")
    status, err = run_cli(["train", "--epochs", "1"], capsys)
    assert status == 2 and "--out" in err


def test_train_refuses_to_overwrite_a_run(tmp_path, capsys):
    _needs("train")
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.safetensors").write_bytes(b"an earlier run")
    before = snapshot(out)
    status, err = run_cli(["train", "--out", str(out), "--epochs", "1"], capsys)
    assert status == 2 and "--resume" in err
    assert snapshot(out) == before


def test_train_resume_from_a_checkpoint_of_another_model(tmp_path, capsys):
    _needs("train")
    from bnlab.checkpoint import save_checkpoint
    from bnlab.models import lenet
    from bnlab.optim import SGD

    out = tmp_path / "run"
    out.mkdir()
    model = lenet(seed=0)
    save_checkpoint(
        out / "checkpoint", model, SGD(model.parameters(), lr=1.0), model_name="lenet", epoch=1
    )
    before = snapshot(out)
    status, err = run_cli(
        ["train", "--out", str(out), "--model", "lenet-bn", "--resume", "--epochs", "2"], capsys
    )
    assert status == 2 and "lenet-bn" in err and "'lenet'" in err, err
    assert snapshot(out) == before


def test_train_resume_from_a_truncated_checkpoint(tmp_path, capsys):
    _needs("train")
    from bnlab.checkpoint import save_checkpoint
    from bnlab.models import lenet_bn
    from bnlab.optim import SGD

    out = tmp_path / "run"
    out.mkdir()
    model = lenet_bn(seed=0)
    w = save_checkpoint(
        out / "checkpoint", model, SGD(model.parameters(), lr=1.0), model_name="lenet-bn", epoch=1
    )
    w.write_bytes(w.read_bytes()[:-64])
    before = snapshot(out)
    status, err = run_cli(["train", "--out", str(out), "--resume", "--epochs", "2"], capsys)
    assert status == 2 and "truncated" in err and "checkpoint.safetensors" in err, err
    assert snapshot(out) == before


def _garbage(folder):
    (folder / "c.safetensors").write_bytes(b"\x10" + bytes(20))
    return folder / "c"


@pytest.mark.parametrize(
    "make, needle",
    [(lambda d: d / "missing", "missing: no such run folder"), (_garbage, "c.safetensors")],
    ids=["missing", "garbage"],
)
def test_evaluate_bad_checkpoint(tmp_path, capsys, make, needle):
    _needs("evaluate")
    path = make(tmp_path)
    status, err = run_cli(["evaluate", "--checkpoint", str(path)], capsys)
    assert status == 2 and needle in err, err


def test_evaluate_bad_batch_size(tmp_path, capsys):
    _needs("evaluate")
    status, err = run_cli(["evaluate", "--checkpoint", str(tmp_path), "--batch-size", "0"], capsys)
    assert status == 2 and "--batch-size" in err


def test_experiment_unknown_name_and_bad_seeds(tmp_path, capsys):
    _needs("experiment")
    status, err = run_cli(["experiment", "no-such-claim", "--out", str(tmp_path / "o")], capsys)
    assert status == 2 and "no-such-claim" in err
    status, err = run_cli(
        ["experiment", "all", "--seeds", "0", "--out", str(tmp_path / "o")], capsys
    )
    assert status == 2 and "--seeds" in err
    assert not (tmp_path / "o").exists()


def test_unknown_command(capsys):
    status, err = run_cli(["fly"], capsys)
    assert status == 2 and "invalid choice" in err


class _Payload:
    def __reduce__(self):
        return (pytest.fail, ("a pickle payload was executed",))


def test_fold_bad_files_and_options(tmp_path, capsys):
    _needs("fold")
    import numpy as np

    from bnlab.io import save_safetensors

    weights = tmp_path / "w.safetensors"
    save_safetensors(weights, {"a": np.ones(3, np.float32)})
    before = snapshot(tmp_path)
    cases = [
        (["--weights", str(weights), "--out", str(tmp_path / "o.pt")], "--out must end in"),
        (["--weights", str(weights), "--out", str(weights)], "--out must differ"),
        (["--weights", str(tmp_path / "none.npz"), "--out", str(tmp_path / "o.npz")], "none.npz"),
    ]
    for args, needle in cases:
        status, err = run_cli(["fold", *args], capsys)
        assert status == 2 and needle in err, err
    assert snapshot(tmp_path) == before  # nothing written, the input untouched


def test_fold_refuses_garbage_and_pickles(tmp_path, capsys):
    _needs("fold")
    import pickle

    torch = pytest.importorskip("torch")
    (tmp_path / "g.safetensors").write_bytes(b"\x08" + bytes(30))
    torch.save({"w": _Payload()}, tmp_path / "evil.pt")
    (tmp_path / "evil.npz").write_bytes(pickle.dumps(_Payload()))
    before = snapshot(tmp_path)
    for name in ("g.safetensors", "evil.pt", "evil.npz"):
        out = tmp_path / f"out-{name}.safetensors"
        status, err = run_cli(
            ["fold", "--weights", str(tmp_path / name), "--out", str(out)], capsys
        )
        assert status == 2 and name in err, err
    assert snapshot(tmp_path) == before


def test_infer_bad_values_and_files(tmp_path, capsys):
    _needs("infer")
    import numpy as np

    np.save(tmp_path / "obj.npy", np.array([_Payload], dtype=object), allow_pickle=True)
    np.save(tmp_path / "gray.npy", np.zeros((8, 8), np.uint8))
    cases = [
        (["--weights", "w.safetensors", "--input", "x.npy", "--topk", "0"], "--topk"),
        (
            [
                "--weights",
                str(tmp_path / "missing.safetensors"),
                "--input",
                str(tmp_path / "gray.npy"),
            ],
            "gray.npy",
        ),  # fmt: skip
        (["--weights", "w.safetensors", "--input", str(tmp_path / "obj.npy")], "pickle"),
        (["--weights", "w.safetensors", "--input", str(tmp_path / "x.bmp")], "x.bmp"),
    ]
    for args, needle in cases:
        status, err = run_cli(["infer", *args], capsys)
        assert status == 2 and needle in err, (args, err)


def test_diagnose_bad_values(tmp_path, capsys):
    _needs("diagnose")
    for args, needle in (
        (["--batch-size", "0"], "--batch-size"),
        (["--batches", "-1"], "--batches"),
        ([], "none: no such run folder"),
    ):
        status, err = run_cli(["diagnose", "--checkpoint", str(tmp_path / "none"), *args], capsys)
        assert status == 2 and needle in err, (args, err)
