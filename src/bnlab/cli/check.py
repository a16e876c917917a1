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
    parser.add_argument(
        "--explain",
        action="store_true",
        help="also print, per case, what the default backend runs and which kernel path and "
        "kernels backend='numba' runs (bnlab.kernels.explain)",
    )


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
    if args.explain:
        print("\n" + explain_table(rows))
    print(f"{len(rows)} cases, {len(failed)} failed, {time.perf_counter() - start:.1f} s")
    return 1 if failed else 0


def explain_table(rows) -> str:
    """Per checked case: the default backend's choice and the kernels' plan (a Markdown table)."""
    import numpy as np

    from bnlab.check import GN_GROUPS, layer_norm_shape
    from bnlab.functional._layout import get_layout
    from bnlab.kernels import explain

    lines = [
        "| operation | layout | shape | default backend | numba path | kernels (fwd; bwd) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        x = np.zeros(r.shape)
        norm, kw = _explain_args(r.op, r.layout, r.shape, GN_GROUPS, layer_norm_shape, get_layout)
        default = explain(x, r.layout, norm=norm, **kw)
        kernels = explain(x, r.layout, norm=norm, backend="numba", **kw)
        path = kernels.plan.path if kernels.plan else "- (" + kernels.reason + ")"
        names = "; ".join(", ".join(k) for k in kernels.kernels.values()) or "-"
        cells = [r.op, r.layout, "x".join(map(str, r.shape)), default.backend, path, names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _explain_args(op, layout, shape, groups, layer_norm_shape, get_layout):
    if op.startswith("batch_norm"):
        return "batch_norm", {"training": op.endswith("[train]")}
    if op == "layer_norm":
        return "layer_norm", {"normalized_shape": layer_norm_shape(shape, layout)}
    c = shape[get_layout(layout).channel_axis]
    return "group_norm", {"num_groups": c if op == "instance_norm" else groups}
