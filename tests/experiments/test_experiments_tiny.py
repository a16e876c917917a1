"""Every experiment end to end in its ``tiny`` budget on the real Fashion-MNIST.

Checks: strict well-formed JSON with the documented keys, a non-empty PNG per figure, the
report section present, and every number printed in the section traceable to results.json.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re

import pytest

from bnlab.experiments import EXPERIMENTS, load_experiment, run_experiment
from bnlab.experiments._report import section_body
from bnlab.experiments._summary import fmt

# Numbers as fmt() prints them: 4 decimals, or 3-digit scientific notation.
NUMBER = re.compile(r"(?<![\w.])-?(?:\d+\.\d{4}|\d\.\d{3}e[+-]\d{2})(?![\w])")
NEEDS_TORCH = {"from-scratch"}


def _numbers_in(obj) -> set[str]:
    """fmt() of every number anywhere in a JSON document."""
    if isinstance(obj, dict):
        return set().union(*(_numbers_in(v) for v in obj.values())) if obj else set()
    if isinstance(obj, list):
        return set().union(*(_numbers_in(v) for v in obj)) if obj else set()
    if isinstance(obj, (int, float)) and not isinstance(obj, bool) and math.isfinite(obj):
        return {fmt(obj)}
    return set()


def _run(name, root):
    out = root / name
    result = run_experiment(name, out, budget="tiny", seeds=2, progress=False)
    return out, result


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_experiment_tiny_end_to_end(name, fashion_mnist_dir, tmp_path):
    if name in NEEDS_TORCH and importlib.util.find_spec("torch") is None:
        pytest.skip("torch not installed")
    out, result = _run(name, tmp_path)
    text = (out / "results.json").read_text()
    stored = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
    assert stored == result
    for key in ("config", "per_seed", "summary", "verdict", "figures", "seeds", "claim"):
        assert key in stored, key
    assert stored["status"] == "ok" and stored["seeds"] == [0, 1] and len(stored["per_seed"]) == 2
    assert stored["verdict"]["holds"] in (True, False, None) and stored["verdict"]["text"]
    assert stored["figures"]
    for fig in stored["figures"]:
        data = (out / fig).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, fig

    body = section_body(tmp_path / "experiments.md", name)
    assert body is not None and stored["claim"] in body
    for fig in stored["figures"]:
        assert f"]({name}/{fig})" in body
    assert stored["verdict"]["text"] in body
    printed = set(NUMBER.findall(body))
    assert printed, "the report section shows no numbers"
    untraceable = printed - _numbers_in(stored)
    assert not untraceable, f"numbers in the report that are not in results.json: {untraceable}"


@pytest.mark.parametrize("name", ["init-scale", "population-stats"])
def test_fixed_seed_gives_identical_json(name, fashion_mnist_dir, tmp_path):
    run_experiment(name, tmp_path / "a", budget="tiny", seeds=1, progress=False)
    run_experiment(name, tmp_path / "b", budget="tiny", seeds=1, progress=False)
    assert (tmp_path / "a/results.json").read_bytes() == (tmp_path / "b/results.json").read_bytes()


def test_from_scratch_without_torch_is_reported_as_skipped(monkeypatch, tmp_path):
    mod = load_experiment("from-scratch")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        mod.importlib.util, "find_spec", lambda n, *a: None if n == "torch" else real(n, *a)
    )
    result = run_experiment("from-scratch", tmp_path / "fs", budget="tiny", seeds=1,
                            progress=False)  # fmt: skip
    assert result["status"] == "skipped"
    assert result["skip_reason"].startswith("torch not installed")
    body = section_body(tmp_path / "experiments.md", "from-scratch")
    assert "**Skipped:** torch not installed" in body


def test_from_scratch_implementations_agree_with_torch(fashion_mnist_dir, tmp_path):
    """Not just well-formed: in float64 the engine, d2l and drop-in BNs track torch.nn step by
    step (d2l's running variance after the exact biased->unbiased conversion)."""
    pytest.importorskip("torch")
    result = run_experiment("from-scratch", tmp_path / "fs", budget="tiny", seeds=1,
                            progress=False)  # fmt: skip
    tol = result["config"]["tolerance"]
    for impl in ("engine", "d2l", "drop-in"):
        s = result["summary"][impl]
        for q in ("logits", "grads", "running_mean", "running_var_converted"):
            assert s[q] <= tol, (impl, q, s[q])
    assert result["summary"]["d2l"]["running_var"] > 1e3 * tol  # the biased convention shows
    assert result["verdict"]["holds"] is True


def test_population_stats_engine_matches_ioffe_formula(fashion_mnist_dir, tmp_path):
    """The engine's cumulative average (momentum=None) equals bnlab.recalibrate's population
    statistics E[μ_B], m/(m−1)·E[σ²_B] over the same batches."""
    result = run_experiment("population-stats", tmp_path / "ps", budget="tiny", seeds=1,
                            progress=False)  # fmt: skip
    assert result["summary"]["engine_vs_formula_max_abs_diff"] < 1e-5
