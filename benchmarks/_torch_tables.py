"""Markdown tables of bench_torch.py's results, from the rows it returns or writes as JSON.

    python benchmarks/bench_torch.py --table benchmarks/results/bench_torch_sweep_2thread.json

prints the tables of a saved run again (the kind of result is read from its keys).
"""

from __future__ import annotations

import itertools
import statistics


def size_label(nbytes: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:g} {unit}"
    return f"{nbytes} B"


def environment_line(env: dict) -> str:
    start = env.get("loadavg_1_5_15_at_start")
    end = env.get("loadavg_1_5_15_at_end", env.get("loadavg_1_5_15"))
    load = f"load (1 min) {start[0]:.2f} at start, {end[0]:.2f} at end" if start else ""
    if not start and end:
        load = f"load (1 min) {end[0]:.2f}"
    return (
        f"torch {env['torch']}, {env['torch_threads']} torch threads, "
        f"{env['numba_threads']} numba threads, {env['cpu_count']} CPUs, "
        f"{env['repeats']} rounds; OMP_WAIT_POLICY for torch: "
        f"{env.get('omp_wait_policy_torch', env.get('omp_wait_policy'))}; {load}"
    )


def sweep_table(rows) -> str:
    """One line per mode, layout and size of x: the cases of that size pooled. Speedups are
    medians (and the worst) of each case's median per-round ratio torch / peer."""
    lines = [
        "| mode | layout | size of x | cases | `nn.BatchNorm2d` ms "
        "| kernels forced | bnlab as dispatched: median (worst) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]

    def key(r):
        return (not r["training"], r["format"], r["bytes"])

    for (evaluating, fmt, nbytes), group in itertools.groupby(sorted(rows, key=key), key=key):
        group = list(group)
        ours = [r["bnlab_speedup"] for r in group]
        lines.append(
            f"| {'eval' if evaluating else 'train'} | {fmt} | {size_label(nbytes)} | {len(group)} "
            f"| {statistics.median(r['torch_ms'] for r in group):.3f} "
            f"| {statistics.median(r['kernels_speedup'] for r in group):.2f}x "
            f"| {statistics.median(ours):.2f}x ({min(ours):.2f}x) |"
        )
    return "\n".join(lines)


def compiled_table(rows) -> str:
    lines = [
        "| mode | layout | shape | size | `nn.BatchNorm2d` + ReLU compiled, ms "
        "| custom ops | PyTorch route |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {'train' if r['training'] else 'eval'} | {r['format']} | {tuple(r['shape'])} "
            f"| {size_label(r['bytes'])} | {r['torch_ms']:.2f} | {r['kernels_speedup']:.2f}x "
            f"| {r['pytorch-op_speedup']:.2f}x |"
        )
    return "\n".join(lines)


def layer_table(rows, env) -> str:
    """The default run: one BN layer fwd+bwd in both formats and the LeNet-BN step."""
    lines = [
        f"bnlab backend `{env['bnlab_backend']}`; NumPy copy bandwidth {env['copy_gbs']:.1f} GB/s; "
        f"{environment_line(env)}",
        "",
        "| case | nn.BatchNorm2d ms | bnlab ms | speedup | bnlab GB/s (% of copy) "
        "| page faults per call: torch / bnlab |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        bw = f"{r['bnlab_gbs']:.1f} ({r['bnlab_pct_of_copy']:.0f}%)" if "bnlab_gbs" in r else "-"
        pf = f"{r['torch_page_faults']:.0f} / {r['bnlab_page_faults']:.0f}"
        lines.append(
            f"| {r['case']} | {r['torch_ms']:.2f} | {r['bnlab_ms']:.2f} | "
            f"{r['speedup']:.2f}x | {bw} | {pf} |"
        )
    return "\n".join(lines)


RESNET_RATIOS = (
    ("converted eager vs stock eager", "converted_eager_vs_stock_eager"),
    ("converted compiled vs stock compiled", "converted_compiled_vs_stock_compiled"),
    ("stock compiled vs stock eager", "stock_compiled_vs_stock_eager"),
    ("converted compiled vs stock eager", "converted_compiled_vs_stock_eager"),
)


def resnet18_table(result: dict) -> str:
    lines = ["| variant | median ms per step |", "|---|---:|"]
    lines += [f"| {name} | {ms:.0f} |" for name, ms in result["median_ms"].items()]
    lines += ["", "| speedup (median of per-round ratios) | |", "|---|---:|"]
    lines += [f"| {label} | {result[key]:.3f}x |" for label, key in RESNET_RATIOS]
    return "\n".join(lines)


def tables(result: dict) -> str:
    """The tables of any result bench_torch.py writes, headed by its environment line."""
    head = environment_line(result["env"])
    if "median_ms" in result:
        return f"{head}\n\n{resnet18_table(result)}"
    rows = result["rows"]
    if rows and rows[0].get("compiled"):
        return f"{head}\n\n{compiled_table(rows)}"
    if rows and "kernels_speedup" in rows[0]:
        return f"{head}\n\n{sweep_table(rows)}"
    return layer_table(rows, result["env"])
