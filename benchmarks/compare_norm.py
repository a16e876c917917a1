"""Compare bench_norm results: the "x PyTorch" ratios of two sets of runs, shape by shape.

    .venv/bin/python benchmarks/compare_norm.py --before A1.json A2.json --after B1.json B2.json

Each run measures PyTorch and bnlab in the same process, so its ratio (PyTorch time / bnlab time,
> 1: bnlab faster) already cancels most of the machine's load of the moment; runs taken back to
back (A1, B1, A2, B2, ...) are paired. Per row: the median ratio of each set, and after/before
(1.00: unchanged; 0.90: bnlab lost 10 % against PyTorch). The load average of every run is
printed with it.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _load(name: str) -> dict:
    path = Path(name)
    if not path.exists():
        path = RESULTS / (name if name.endswith(".json") else name + ".json")
    return json.loads(path.read_text())


def ratios(run: dict) -> dict[str, float]:
    """(row label -> x PyTorch) for every batch-norm row and the layer/group norm rows."""
    out = {f"{r['shape']} {r['layout']} {r['op']}": r["speedup"] for r in run["rows"]}
    out.update({f"{r['norm']} {r['shape']} fwd_bwd": r["speedup"] for r in run["family"]})
    return out


def table(before: list[dict], after: list[dict]) -> str:
    b = [ratios(r) for r in before]
    a = [ratios(r) for r in after]
    lines = [
        "| row | x PyTorch before (median) | x PyTorch after (median) | after / before | runs |",
        "|---|---|---|---|---|",
    ]
    for key in b[0]:
        mb = statistics.median(x[key] for x in b if key in x)
        ma = statistics.median(x[key] for x in a if key in x)
        lines.append(f"| {key} | {mb:.2f} | {ma:.2f} | {ma / mb:.2f} | {len(b)} + {len(a)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", nargs="+", required=True, help="bench_norm JSON files (or names)")
    p.add_argument("--after", nargs="+", required=True, help="bench_norm JSON files (or names)")
    args = p.parse_args(argv)
    before = [_load(n) for n in args.before]
    after = [_load(n) for n in args.after]
    print(table(before, after))
    for label, runs in (("before", before), ("after", after)):
        loads = [r["machine"].get("loadavg_1_5_15", ["?"])[0] for r in runs]
        print(f"{label}: load average (1 min) at the start of each run: {loads}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
