"""The shared runner: seeds, bookkeeping, results.json, figures and the report section.

An experiment is a module of this package defining

    NAME, TITLE, CLAIM, SOURCE          strings (SOURCE: where the claim comes from)
    config(budget) -> dict              the knobs for budget "full", "quick" or "tiny"
    run_seed(cfg, seed, progress) -> dict
                                        one seed's raw numbers (JSON types; NaN allowed)
    summarize(per_seed, cfg) -> dict    aggregates over seeds (see ``_summary.mean_std``)
    verdict(summary, cfg) -> Verdict    does the claim hold, one line with the numbers
    plot(result, out_dir) -> list[str]  PNG file names written into out_dir
    report(result) -> str               Markdown: setup and tables, from ``result`` only
    unavailable() -> str | None         (optional) why it cannot run here, e.g. no torch

``progress(total, desc)`` returns a :class:`bnlab.progress.Progress` (a context manager).
The runner never measures time into results.json, so a fixed seed gives identical JSON.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from bnlab.experiments._io import dumps_json, ensure_writable_dir, write_json
from bnlab.experiments._registry import load_experiment
from bnlab.experiments._report import relative_link, render_section, update_report
from bnlab.progress import Progress

BUDGETS = ("full", "quick", "tiny")
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Verdict:
    """``holds``: True / False / None (inconclusive); ``text``: one line with the numbers."""

    holds: bool | None
    text: str


def default_report_path(out_dir: Path) -> Path:
    """``reports/NAME`` -> ``reports/experiments.md``."""
    return Path(out_dir).parent / "experiments.md"


def command_line(name: str, budget: str, seeds: list[int]) -> str:
    flag = {"full": "", "quick": " --quick", "tiny": " --tiny"}[budget]
    return f"bnlab experiment {name}{flag} --seeds {len(seeds)}"


def _seed_list(seeds: int) -> list[int]:
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be a positive integer (how many seeds), got {seeds!r}")
    return list(range(seeds))


def _check_budget(budget: str) -> None:
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}")


def require_matplotlib() -> None:
    """Fail before training, not after it, when the figures cannot be drawn."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ModuleNotFoundError(
            "bnlab experiments draw PNG figures with matplotlib, which is not installed: "
            "pip install 'bnlab[plots]'"
        )


def run_experiment(
    name: str,
    out_dir: str | Path | None = None,
    *,
    budget: str = "quick",
    seeds: int = 3,
    report_path: str | Path | None = None,
    progress: bool = True,
    config_overrides: dict | None = None,
) -> dict:
    """Run experiment ``name`` over ``seeds`` seeds (0, 1, …) and write its outputs.

    Writes ``out_dir/results.json``, ``out_dir/*.png`` and the experiment's section of
    ``report_path`` (default ``out_dir/../experiments.md``). Returns the result dict exactly
    as stored in results.json. Bad arguments fail before any training starts.
    """
    exp = load_experiment(name)
    require_matplotlib()
    _check_budget(budget)
    seed_list = _seed_list(seeds)
    out_dir = ensure_writable_dir(Path(out_dir or Path("reports") / name), "--out")
    report_path = Path(report_path) if report_path else default_report_path(out_dir)
    ensure_writable_dir(report_path.parent, "report directory")

    cfg = exp.config(budget)
    unknown = set(config_overrides or {}) - set(cfg)
    if unknown:
        raise ValueError(
            f"config_overrides has unknown keys {sorted(unknown)}; known: {sorted(cfg)}"
        )
    cfg.update(config_overrides or {})

    result = {
        "schema_version": SCHEMA_VERSION,
        "experiment": name,
        "title": exp.TITLE,
        "claim": exp.CLAIM,
        "source": exp.SOURCE,
        "budget": budget,
        "command": command_line(name, budget, seed_list),
        "config": cfg,
        "seeds": seed_list,
        "status": "ok",
    }
    reason = exp.unavailable() if hasattr(exp, "unavailable") else None
    if reason:
        result.update(status="skipped", skip_reason=reason, figures=[])
        print(f"{name}: skipped: {reason}", file=sys.stderr)
    else:
        result.update(_run_seeds(exp, name, cfg, seed_list, progress))
        # Round-trip through JSON first: plots and report see exactly the stored numbers.
        result = json.loads(dumps_json(result))
        result["figures"] = list(exp.plot(result, out_dir))
    result = json.loads(dumps_json(result))
    write_json(out_dir / "results.json", result)
    _write_section(exp, result, out_dir, report_path)
    return result


def replot_experiment(
    name: str, out_dir: str | Path | None = None, *, report_path: str | Path | None = None
) -> dict:
    """Re-derive summary, verdict, figures and report section from the raw per-seed numbers
    of an existing ``results.json`` (no training): all four are pure functions of them."""
    from bnlab.errors import DataFormatError  # noqa: PLC0415

    exp = load_experiment(name)
    out_dir = Path(out_dir or Path("reports") / name)
    path = out_dir / "results.json"
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"--replot: no results to redraw, {str(path)!r} does not exist"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataFormatError(f"--replot: {str(path)!r} is not valid JSON: {err}") from None
    if not isinstance(result, dict) or result.get("experiment") != name:
        raise DataFormatError(f"--replot: {str(path)!r} holds no results of experiment {name!r}")
    ensure_writable_dir(out_dir, "--out")
    report_path = Path(report_path) if report_path else default_report_path(out_dir)
    if result["status"] == "ok":
        summary = exp.summarize(result["per_seed"], result["config"])
        verdict = exp.verdict(json.loads(dumps_json(summary)), result["config"])
        result["summary"] = summary
        result["verdict"] = {"holds": verdict.holds, "text": verdict.text}
        result = json.loads(dumps_json(result))
        result["figures"] = list(exp.plot(result, out_dir))
        write_json(path, result)
    _write_section(exp, result, out_dir, report_path)
    return result


def _run_seeds(exp, name: str, cfg: dict, seed_list: list[int], progress: bool) -> dict:
    def make_bar(total: int, desc: str) -> Progress:
        # enabled=None: draw on a terminal, stay silent in logs; False: never draw.
        return Progress(total, f"{name} {desc}", enabled=None if progress else False)

    per_seed = []
    for seed in seed_list:
        raw = exp.run_seed(cfg, seed, make_bar)
        per_seed.append(json.loads(dumps_json(raw)))
    summary = exp.summarize(per_seed, cfg)
    verdict = exp.verdict(summary, cfg)
    return {
        "per_seed": per_seed,
        "summary": summary,
        "verdict": {"holds": verdict.holds, "text": verdict.text},
    }


def _write_section(exp, result: dict, out_dir: Path, report_path: Path) -> None:
    body = exp.report(result) if result["status"] == "ok" else ""
    links = [relative_link(out_dir / f, report_path) for f in result.get("figures", [])]
    update_report(report_path, result["experiment"], render_section(result, body, links))
