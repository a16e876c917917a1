"""``reports/experiments.md``: one section per experiment, rewritten in place on each run.

Sections are delimited by HTML comments so a rerun of one experiment replaces only its own
section; sections are kept in the registry's order. The file is written atomically.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from bnlab.experiments._registry import EXPERIMENTS
from bnlab.io import atomic_write_text

HEADER = """# bnlab experiments: the textbooks' claims about batch normalization, checked

Each section is written by `bnlab experiment NAME` (see the command line in it) from that run's
`results.json`; numbers are mean ± sample standard deviation over seeds. A claim that does not
hold in these numbers is reported as not holding.
"""

_SECTION = re.compile(
    r"<!-- bnlab-experiment: (?P<name>[a-z0-9-]+) -->\n.*?<!-- /bnlab-experiment: (?P=name) -->\n",
    re.S,
)


def section_markers(name: str) -> tuple[str, str]:
    return f"<!-- bnlab-experiment: {name} -->\n", f"<!-- /bnlab-experiment: {name} -->\n"


def read_sections(report: Path) -> dict[str, str]:
    """Existing sections of ``report`` by experiment name (empty when the file is absent)."""
    if not report.exists():
        return {}
    text = report.read_text(encoding="utf-8")
    return {m["name"]: m.group(0) for m in _SECTION.finditer(text)}


def section_body(report: Path, name: str) -> str | None:
    """The Markdown between the markers of ``name``'s section, or None."""
    sec = read_sections(report).get(name)
    if sec is None:
        return None
    begin, end = section_markers(name)
    return sec[len(begin) : -len(end)]


def update_report(report: Path, name: str, body: str) -> None:
    """Replace (or add) the section of experiment ``name`` and rewrite ``report`` atomically."""
    begin, end = section_markers(name)
    sections = read_sections(report)
    sections[name] = begin + body.rstrip("\n") + "\n" + end
    order = list(EXPERIMENTS) + sorted(set(sections) - set(EXPERIMENTS))
    parts = [HEADER] + [sections[n] for n in order if n in sections]
    atomic_write_text(report, "\n".join(parts))


def relative_link(target: Path, report: Path) -> str:
    """Path of ``target`` relative to the report's folder, with forward slashes."""
    return Path(os.path.relpath(Path(target).resolve(), Path(report).resolve().parent)).as_posix()


BUDGET_NOTES = {
    "full": "*Full budget (the textbooks' scale, >= 3 seeds for comparative claims).*",
    "quick": "*Quick budget: less data and fewer steps than the textbooks' runs; the verdict "
    "is about this budget, and the full budget (without `--quick`) may differ.*",
    "tiny": "*Tiny budget: a smoke test of the pipeline; these numbers mean nothing.*",
}


def verdict_word(holds: bool | None) -> str:
    return {True: "holds", False: "does NOT hold", None: "inconclusive"}[holds]


def render_section(result: dict, body: str, figure_links: list[str]) -> str:
    """The full section: claim, setup, command, figures, the experiment's body, verdict."""
    lines = [f"## `{result['experiment']}`: {result['title']}", ""]
    lines += [f"**Claim.** {result['claim']} *({result['source']})*", ""]
    lines += [
        f"**Command.** `{result['command']}` (budget `{result['budget']}`, "
        f"seeds {', '.join(str(s) for s in result['seeds']) or '-'})",
        "",
    ]
    lines += [BUDGET_NOTES[result["budget"]], ""]
    if result["status"] == "skipped":
        lines += [f"**Skipped:** {result['skip_reason']}", ""]
        return "\n".join(lines)
    for link in figure_links:
        lines += [f"![{result['title']}]({link})", ""]
    lines += [body.strip(), ""]
    verdict = result["verdict"]
    lines += [f"**Verdict: the claim {verdict_word(verdict['holds'])}.** {verdict['text']}", ""]
    return "\n".join(lines)
