"""``bnlab check``: check every normalization implementation and print a table of max errors."""

from __future__ import annotations

HELP = (
    "check every implementation (closed-form vs graph backward, numeric gradients, PyTorch, numba) "
    "on random inputs in every layout; exit 1 if an error exceeds its tolerance"
)


def add_arguments(parser) -> None:
    from bnlab.cli._args import nonneg_int

    parser.add_argument(
        "--seed", type=nonneg_int, default=0, help="seed of the random inputs (default 0)"
    )
    parser.add_argument(
        "--no-torch", action="store_true", help="skip the PyTorch comparison even if torch imports"
    )
    parser.add_argument("--no-numba", action="store_true", help="skip the numba-backend comparison")


def run(args) -> int:
    import time

    from bnlab.check import TOLERANCES, format_table, run_checks, torch_available

    start = time.perf_counter()
    use_torch = False if args.no_torch else None
    use_numba = False if args.no_numba else None
    rows = run_checks(args.seed, use_torch=use_torch, use_numba=use_numba)
    print(format_table(rows))
    failed = [r for r in rows if r.failures()]
    ran = [k for k in TOLERANCES if any(r.errors.get(k) is not None for r in rows)]
    skipped = [k for k in TOLERANCES if k not in ran]
    not_run = f"; not run: {', '.join(skipped)}" if skipped else ""
    print(f"\nchecks run: {', '.join(ran)}{not_run}")
    if "torch" in skipped and not args.no_torch and not torch_available():
        print("(torch is not installed: pip install 'bnlab[torch]' to compare with PyTorch)")
    print(f"{len(rows)} cases, {len(failed)} failed, {time.perf_counter() - start:.1f} s")
    return 1 if failed else 0
