"""``bnlab experiment NAME|all [--quick|--tiny] [--seeds 3] [--out reports/NAME]``."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from bnlab.cli._args import positive_int

HELP = "reproduce a textbook claim about batch norm: results.json, PNG plots, report section"


def add_arguments(parser) -> None:
    from bnlab.experiments._registry import EXPERIMENTS  # noqa: PLC0415 (light: no numpy)

    parser.add_argument(
        "name",
        metavar="NAME",
        help=f"one of: {', '.join(EXPERIMENTS)}; or 'all' to run every experiment in order",
    )
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument(
        "--quick",
        action="store_const",
        const="quick",
        dest="budget",
        help="smaller budgets (all seven: about 10 minutes on 2 shared cores)",
    )
    budget.add_argument(
        "--tiny",
        action="store_const",
        const="tiny",
        dest="budget",
        help="smoke test of the pipeline in seconds; the numbers mean nothing",
    )
    parser.set_defaults(budget="full")
    parser.add_argument(
        "--seeds",
        type=positive_int,
        default=3,
        metavar="N",
        help="number of seeds 0..N-1 (default 3)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default reports/NAME; with 'all': the parent, default reports)",
    )
    parser.add_argument(
        "--report",
        type=Path,
        default=None,
        help="Markdown report to update (default: experiments.md next to the output folder)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--replot",
        action="store_true",
        help="no training: re-derive summary, verdict, figures and report from OUT/results.json",
    )


def _targets(args) -> list[tuple[str, Path, Path]]:
    """(name, out_dir, report) for each experiment to run; raises for an unknown name."""
    from bnlab.experiments._registry import EXPERIMENTS, load_experiment  # noqa: PLC0415
    from bnlab.experiments._runner import default_report_path  # noqa: PLC0415

    if args.name == "all":
        root = args.out or Path("reports")
        report = args.report or root / "experiments.md"
        return [(name, root / name, report) for name in EXPERIMENTS]
    load_experiment(args.name)  # unknown name -> error listing the valid ones
    out = args.out or Path("reports") / args.name
    return [(args.name, out, args.report or default_report_path(out))]


def run(args) -> int:
    from bnlab.cli import EXIT_INTERNAL, EXIT_USAGE, describe, usage_errors  # noqa: PLC0415
    from bnlab.errors import UsageError  # noqa: PLC0415
    from bnlab.experiments._io import ensure_writable_dir  # noqa: PLC0415
    from bnlab.experiments._runner import (  # noqa: PLC0415
        replot_experiment,
        require_matplotlib,
        run_experiment,
    )

    try:
        targets = _targets(args)
        require_matplotlib()
    except ImportError as err:
        raise UsageError(str(err)) from None
    for _, out, report in targets:  # fail before hours of training, not after
        ensure_writable_dir(out, "--out")
        ensure_writable_dir(report.parent, "--report")

    if args.replot:
        for name, out, report in targets:
            replot_experiment(name, out, report_path=report)
            print(f"{name}: figures and report re-derived from {out}/results.json")
        return 0

    status = 0
    for name, out, report in targets:
        start = time.monotonic()
        try:
            result = run_experiment(
                name,
                out,
                budget=args.budget,
                seeds=args.seeds,
                report_path=report,
                progress=not args.no_progress,
            )
        except Exception as err:  # with 'all', one failing experiment must not cost the others
            if len(targets) == 1:
                raise
            print(f"{name}: FAILED: {type(err).__name__}: {describe(err)}", file=sys.stderr)
            status = max(status, EXIT_USAGE if isinstance(err, usage_errors()) else EXIT_INTERNAL)
            continue
        elapsed = time.monotonic() - start
        if result["status"] == "skipped":
            print(f"{name}: skipped ({result['skip_reason']})")
            continue
        verdict = result["verdict"]
        word = {True: "holds", False: "does NOT hold", None: "inconclusive"}[verdict["holds"]]
        print(f"{name}: claim {word}: {verdict['text']}  [{elapsed:.0f}s, {out}/results.json]")
    print(f"report: {targets[-1][2]}")
    return status
