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
    ("batch-size-zero", ["--batch-size", "0"], ["--batch-size", "> 0"]),
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
    [(lambda d: d / "missing", "not found"), (_garbage, "c.safetensors")],
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
