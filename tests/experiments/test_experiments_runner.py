"""The shared runner, report writer and CLI, driven by a fake experiment (no training)."""

from __future__ import annotations

import json
import os
import sys
import types

import numpy as np
import pytest

from bnlab.cli import main
from bnlab.experiments import EXPERIMENTS, UnknownExperimentError, Verdict, run_experiment
from bnlab.experiments._report import section_body
from bnlab.experiments._summary import fmt, fmt_pm, mean_std


def _fake_module() -> types.ModuleType:
    """A tiny experiment: 'accuracy' is a seeded random number, one NaN seed for 'loss'."""
    from bnlab.experiments._plot import new_figure, save_png

    mod = types.ModuleType("bnlab.experiments.fake_exp")
    mod.NAME, mod.TITLE, mod.CLAIM, mod.SOURCE = "fake-exp", "Fake", "Fakes are fake.", "tests"

    def config(budget):
        return {"n": {"full": 100, "quick": 10, "tiny": 2}[budget]}

    def run_seed(cfg, seed, progress):
        rng = np.random.default_rng(seed)
        with progress(cfg["n"], f"seed {seed}") as bar:
            for _ in range(cfg["n"]):
                bar.update(1)
        return {"accuracy": float(rng.random()), "loss": float("nan") if seed == 1 else 1.0}

    def summarize(per_seed, cfg):
        return {k: mean_std(r[k] for r in per_seed) for k in ("accuracy", "loss")}

    def verdict(summary, cfg):
        return Verdict(
            summary["accuracy"]["mean"] > 0.0, f"accuracy {fmt(summary['accuracy']['mean'])}"
        )

    def plot(result, out_dir):
        fig, ax = new_figure()
        ax.plot([0, 1], [0, result["summary"]["accuracy"]["mean"]], label="acc")
        ax.legend()
        return [save_png(fig, out_dir / "fake.png")]

    def report(result):
        return "| metric | value |\n|---|---|\n" + "\n".join(
            f"| {k} | {fmt_pm(v)} |" for k, v in result["summary"].items()
        )

    for f in (config, run_seed, summarize, verdict, plot, report):
        setattr(mod, f.__name__, f)
    return mod


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setitem(EXPERIMENTS, "fake-exp", "fake_exp")
    monkeypatch.setitem(sys.modules, "bnlab.experiments.fake_exp", _fake_module())
    return "fake-exp"


def test_runner_writes_json_png_and_report(fake, tmp_path):
    out = tmp_path / "reports" / fake
    result = run_experiment(fake, out, budget="tiny", seeds=2, progress=False)
    stored = json.loads((out / "results.json").read_text())
    assert stored == result
    assert stored["seeds"] == [0, 1] and len(stored["per_seed"]) == 2
    assert stored["per_seed"][1]["loss"] is None  # NaN stored as strict-JSON null
    assert stored["summary"]["loss"] == {"mean": 1.0, "std": None, "n": 1, "n_failed": 1}
    png = out / "fake.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    body = section_body(tmp_path / "reports" / "experiments.md", fake)
    assert "![Fake](fake-exp/fake.png)" in body
    assert fmt_pm(stored["summary"]["accuracy"]) in body
    assert "the claim holds" in body


def test_rerun_replaces_only_its_section(fake, tmp_path):
    report = tmp_path / "experiments.md"
    report.write_text(
        "<!-- bnlab-experiment: bn-vs-none -->\nOTHER\n<!-- /bnlab-experiment: bn-vs-none -->\n"
    )
    run_experiment(fake, tmp_path / "a", budget="tiny", seeds=1, report_path=report, progress=False)
    first = report.read_text()
    run_experiment(fake, tmp_path / "a", budget="tiny", seeds=1, report_path=report, progress=False)
    assert report.read_text() == first
    assert first.count("bnlab-experiment: fake-exp -->") == 2 and "OTHER" in first


def test_fixed_seed_gives_identical_json(fake, tmp_path):
    run_experiment(fake, tmp_path / "a", budget="tiny", seeds=3, progress=False)
    run_experiment(fake, tmp_path / "b", budget="tiny", seeds=3, progress=False)
    assert (tmp_path / "a/results.json").read_bytes() == (tmp_path / "b/results.json").read_bytes()


def test_unknown_name_lists_valid_ones(tmp_path, capsys):
    with pytest.raises(UnknownExperimentError, match="init-scale"):
        run_experiment("nope", tmp_path)
    assert main(["experiment", "nope", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "unknown experiment 'nope'" in err
    for name in (
        "bn-vs-none",
        "init-scale",
        "batch-size",
        "population-stats",
        "from-scratch",
        "gamma-beta",
        "covariate-shift",
    ):
        assert name in err
    assert not (tmp_path / "x").exists()


@pytest.fixture
def unwritable_dir(tmp_path):
    """A folder we cannot create files in: chmod 500 normally; /proc when root ignores modes."""
    if os.geteuid() == 0:
        yield "/proc/bnlab-experiments-out"  # mkdir in /proc fails even for root
        return
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    yield str(locked / "out")
    locked.chmod(0o700)


def test_unwritable_output_dir_is_a_clear_error(fake, unwritable_dir, capsys):
    with pytest.raises(PermissionError, match="--out: cannot create output directory"):
        run_experiment(fake, unwritable_dir, budget="tiny", seeds=1, progress=False)
    assert main(["experiment", fake, "--tiny", "--out", unwritable_dir]) == 2
    err = capsys.readouterr().err
    assert "bnlab experiment: error: --out" in err and unwritable_dir in err


def test_output_path_that_is_a_file_is_a_clear_error(fake, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(NotADirectoryError, match="--out must be a directory"):
        run_experiment(fake, blocker, budget="tiny", seeds=1, progress=False)
    assert main(["experiment", fake, "--tiny", "--out", str(blocker / "sub")]) == 2
    assert "error" in capsys.readouterr().err
    assert blocker.read_text() == "x"


def test_bad_seeds_and_budget_fail_before_running(fake, tmp_path, capsys):
    with pytest.raises(ValueError, match="seeds"):
        run_experiment(fake, tmp_path / "o", seeds=0)
    with pytest.raises(ValueError, match="budget"):
        run_experiment(fake, tmp_path / "o", budget="huge")
    assert main(["experiment", fake, "--seeds", "0", "--out", str(tmp_path / "p")]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_cli_runs_and_prints_verdict(fake, tmp_path, capsys):
    out = tmp_path / "r" / fake
    assert (
        main(["experiment", fake, "--tiny", "--seeds", "1", "--out", str(out), "--no-progress"])
        == 0
    )
    text = capsys.readouterr().out
    assert "fake-exp: claim holds" in text
    assert json.loads((out / "results.json").read_text())["command"] == (
        "bnlab experiment fake-exp --tiny --seeds 1"
    )


def test_mean_std_and_formatting():
    s = mean_std([1.0, 2.0, 3.0, float("nan")])
    assert s == {"mean": 2.0, "std": 1.0, "n": 3, "n_failed": 1}
    assert fmt_pm(s) == "2.0000 ± 1.0000 (1 diverged)"
    assert fmt(1.5e-7) == "1.500e-07" and fmt(None) == "n/a" and fmt(0.0) == "0.0000"
    assert mean_std([None])["mean"] is None


def test_replot_redraws_from_results_json_without_training(fake, tmp_path, capsys):
    out = tmp_path / "r" / fake
    run_experiment(fake, out, budget="tiny", seeds=2, progress=False)
    before = (out / "results.json").read_bytes()
    report = tmp_path / "r" / "experiments.md"
    report_before = report.read_text()
    (out / "fake.png").unlink()
    report.unlink()
    assert main(["experiment", fake, "--replot", "--out", str(out)]) == 0
    assert (out / "fake.png").stat().st_size > 1000
    assert (out / "results.json").read_bytes() == before
    assert report.read_text() == report_before


def test_replot_without_results_is_a_clear_error(fake, tmp_path, capsys):
    assert main(["experiment", fake, "--replot", "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "results.json" in err and "does not exist" in err


def test_replot_of_corrupt_results_is_a_clear_error(fake, tmp_path, capsys):
    out = tmp_path / fake
    out.mkdir()
    (out / "results.json").write_text("{not json")
    assert main(["experiment", fake, "--replot", "--out", str(out)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_all_continues_after_a_failing_experiment(fake, monkeypatch, tmp_path, capsys):
    import bnlab.experiments._registry as registry

    monkeypatch.setattr(registry, "EXPERIMENTS", {"fake-exp": "fake_exp", "broken": "broken"})
    broken = _fake_module()
    broken.run_seed = lambda cfg, seed, progress: 1 / 0
    monkeypatch.setitem(sys.modules, "bnlab.experiments.broken", broken)
    status = main(["experiment", "all", "--tiny", "--seeds", "1", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert status == 3  # a crash inside an experiment is an internal error, on one line
    assert "broken: FAILED: ZeroDivisionError" in captured.err
    assert "Traceback" not in captured.err
    assert (tmp_path / "fake-exp" / "results.json").exists()


def test_config_overrides_are_recorded_and_unknown_keys_refused(fake, tmp_path):
    result = run_experiment(fake, tmp_path / "o", budget="tiny", seeds=1, progress=False,
                            config_overrides={"n": 3})  # fmt: skip
    assert result["config"] == {"n": 3}
    with pytest.raises(ValueError, match="unknown keys"):
        run_experiment(fake, tmp_path / "o", budget="tiny", seeds=1, config_overrides={"x": 1})


def test_missing_matplotlib_fails_before_training(fake, monkeypatch, tmp_path):
    import bnlab.experiments._runner as runner

    real = runner.importlib.util.find_spec
    monkeypatch.setattr(
        runner.importlib.util, "find_spec", lambda n, *a: None if n == "matplotlib" else real(n, *a)
    )
    with pytest.raises(ModuleNotFoundError, match=r"bnlab\[plots\]"):
        run_experiment(fake, tmp_path / "m", budget="tiny", seeds=1, progress=False)
    assert not (tmp_path / "m").exists()
