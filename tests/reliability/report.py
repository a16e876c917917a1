"""Run the reliability suite, print the table (family, cases tried, passed), write the doc.

    python tests/reliability/report.py            # run, print, write docs/reliability.md
    python tests/reliability/report.py --no-write # run and print only
    python tests/reliability/report.py -- -x      # extra arguments after -- go to pytest

A *case* is one collected test item (each parametrization counts). Families come from the
``FAMILY`` constant of each test module. A case marked ``xfail(strict=True)`` is a known bug
found by the suite (listed with its reason); it counts as tried, not passed. Exit status: pytest's.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DOC = ROOT / "docs" / "reliability.md"
TEMPLATE = HERE / "reliability_template.md"
TABLE_START, TABLE_END = "<!-- table:start -->", "<!-- table:end -->"


class Collector:
    """pytest plugin: outcome of every case, grouped by family."""

    def __init__(self):
        self.family_of: dict[str, str] = {}
        self.outcomes: dict[str, str] = {}
        self.reasons: dict[str, str] = {}

    def pytest_collection_modifyitems(self, items):
        for item in items:
            module = getattr(item, "module", None)
            family = getattr(module, "FAMILY", Path(item.fspath).stem)
            overrides = getattr(module, "FAMILIES", {})
            self.family_of[item.nodeid] = overrides.get(getattr(item, "originalname", ""), family)

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            if hasattr(report, "wasxfail"):
                outcome = "xfailed" if report.skipped else "failed"  # strict xpass = failure
                self.reasons[report.nodeid] = report.wasxfail
            else:
                outcome = report.outcome
            self.outcomes[report.nodeid] = outcome
        elif report.when == "teardown" and report.failed:
            self.outcomes[report.nodeid] = "failed"

    def rows(self) -> OrderedDict:
        table: OrderedDict[str, dict[str, int]] = OrderedDict()
        for nodeid, family in sorted(self.family_of.items(), key=lambda kv: kv[1]):
            row = table.setdefault(
                family, {"tried": 0, "passed": 0, "xfailed": 0, "failed": 0, "skipped": 0}
            )
            outcome = self.outcomes.get(nodeid, "failed")
            row[outcome] += 1
            if outcome != "skipped":
                row["tried"] += 1
        return table


def format_table(rows: OrderedDict) -> str:
    head = "| family | cases tried | passed | known bugs (xfail) | failed | skipped |"
    lines = [head, "|---|---:|---:|---:|---:|---:|"]
    total = dict.fromkeys(("tried", "passed", "xfailed", "failed", "skipped"), 0)
    for family, r in rows.items():
        lines.append(
            f"| {family} | {r['tried']} | {r['passed']} | {r['xfailed']} | {r['failed']} | "
            f"{r['skipped']} |"
        )
        for k in total:
            total[k] += r[k]
    lines.append(
        f"| **total** | **{total['tried']}** | **{total['passed']}** | **{total['xfailed']}** | "
        f"**{total['failed']}** | **{total['skipped']}** |"
    )
    return "\n".join(lines)


def known_bugs(collector: Collector) -> str:
    items = sorted(
        (n, r) for n, r in collector.reasons.items() if collector.outcomes[n] == "xfailed"
    )
    if not items:
        return "None: every case passes."
    return "\n".join(f"- `{nodeid}`: {reason}" for nodeid, reason in items)


def provenance(seconds: float) -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = "unknown"
    return (
        f"Generated at commit `{commit}` by `python tests/reliability/report.py` "
        f"(Python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"suite ran in {seconds:.0f} s)."
    )


def write_doc(table: str, bugs: str, prov: str) -> None:
    text = TEMPLATE.read_text(encoding="utf-8")
    generated = (
        f"{TABLE_START}\n{prov}\n\n{table}\n\nKnown bugs found by the suite:\n\n{bugs}\n{TABLE_END}"
    )
    text = text.replace("{{TABLE}}", generated)
    sys.path.insert(0, str(ROOT / "src"))
    from bnlab.io import atomic_write_text  # noqa: PLC0415

    DOC.parent.mkdir(exist_ok=True)
    atomic_write_text(DOC, text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="do not write docs/reliability.md")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)
    collector = Collector()
    start = time.perf_counter()
    status = pytest.main(
        [str(HERE), "-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT), *args.pytest_args],
        plugins=[collector],
    )
    seconds = time.perf_counter() - start
    table = format_table(collector.rows())
    print("\n" + table)
    if not args.no_write:
        write_doc(table, known_bugs(collector), provenance(seconds))
        print(f"\nwrote {DOC.relative_to(ROOT)}")
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
