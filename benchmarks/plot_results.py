"""One figure per benchmark, drawn from the JSON the benchmarks write (benchmarks/results/).

    python benchmarks/plot_results.py            # -> docs/figures/bench_*.png

A figure is skipped (with a line saying why) when its JSON is missing. Ratios are what the
benchmarks report: > 1 means bnlab is faster than the peer measured in the same run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).parent / "results"
FIGURES = Path(__file__).parent.parent / "docs" / "figures"


def _load(name: str):
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _bars(ax, labels, series: dict[str, list[float]], ylabel: str, parity: bool = True):
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(labels))]
        ax.bar(xs, values, width, label=name)
    if parity:
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)


def plot_norm(d) -> plt.Figure:
    """bench_norm: bnlab's speed-up over PyTorch per shape and operation."""
    rows = d["rows"]
    labels = [f"{r['shape']} {r['layout']} {r['op']}" for r in rows]
    fig, ax = plt.subplots(figsize=(10, 4))
    _bars(ax, labels, {"bnlab / PyTorch": [r["speedup"] for r in rows]}, "speed-up x PyTorch")
    ax.set_title("Batch-norm kernels vs PyTorch's CPU kernels (bench_norm.py)")
    return fig


def plot_torch(sweep, resnet) -> plt.Figure:
    """bench_torch: the layer sweep (speed-up vs size) and the ResNet-18 step."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    if sweep:
        for training, marker in ((True, "o"), (False, "s")):
            for fmt, color in (("NCHW", "C0"), ("NHWC", "C1")):
                rows = [r for r in sweep["rows"] if r["training"] == training]
                rows = [r for r in rows if r["format"] == fmt]
                a.scatter(
                    [r["bytes"] for r in rows],
                    [r["bnlab_speedup"] for r in rows],
                    marker=marker,
                    color=color,
                    s=14,
                    label=f"{'train' if training else 'eval'} {fmt}",
                )
        a.set_xscale("log")
        a.axhline(1.0, color="black", lw=0.8, ls="--")
        a.set_xlabel("bytes of x")
        a.set_ylabel("speed-up x nn.BatchNorm2d")
        a.set_title("Layer sweep (bench_torch.py --sweep)")
        a.legend(fontsize=8)
    if resnet:
        names = list(resnet["median_ms"])
        b.bar(names, [resnet["median_ms"][n] for n in names], color=["C7", "C7", "C0", "C0"])
        b.set_ylabel("ms per training step")
        b.set_title(f"ResNet-18 step, batch {resnet['batch']} (--resnet18)")
        b.tick_params(axis="x", rotation=35, labelsize=8)
    return fig


def plot_lenet(d) -> plt.Figure:
    """bench_lenet: examples per second, each peer in its own process."""
    settings = d["settings"]
    labels = [s["setting"] for s in settings]
    series = {
        "PyTorch (d2l loop)": [s["median_examples_per_s"]["torch"] for s in settings],
        "bnlab train": [s["median_examples_per_s"]["bnlab"] for s in settings],
    }
    fig, ax = plt.subplots(figsize=(6, 4))
    _bars(ax, labels, series, "training examples / s", parity=False)
    ax.set_title(f"LeNet-BN training, batch {d['batch_size']} (bench_lenet.py)")
    return fig


def plot_zoo(d) -> plt.Figure:
    """bench_zoo: each peer's time over bnlab's, per network and setting."""
    rows = d["rows"]
    labels = [f"{r['model']} b{r['batch']} t{r['threads']}" for r in rows]
    series = {}
    for peer in ("ONNX Runtime", "PyTorch eager", "torch.compile"):
        series[f"{peer} / bnlab"] = [
            r[peer]["median_ms"] / r["bnlab"]["median_ms"] if peer in r else 0.0 for r in rows
        ]
    fig, ax = plt.subplots(figsize=(14, 4.5))
    _bars(ax, labels, series, "peer time / bnlab time")
    ax.set_title(
        f"CNN inference, {d['size']}x{d['size']} float32 (bench_zoo.py); > 1: bnlab faster"
    )
    return fig


def plot_small(d) -> plt.Figure:
    """bench_small: microseconds per call at small sizes: NumPy, kernels, the default."""
    rows = [r for r in d["rows"] if r["norm"] == "batch_norm" and r["mode"] == "train"]
    rows.sort(key=lambda r: r["values"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("numpy_us", "NumPy reference"), ("numba_us", "kernels")):
        ax.plot([r["values"] for r in rows], [r[key] for r in rows], "o-", label=label)
    ax.plot([r["values"] for r in rows], [r["default_us"] for r in rows], "k--", label="default")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("values in x")
    ax.set_ylabel("µs per training forward")
    ax.set_title("Small inputs: which backend the default takes (bench_small.py)")
    ax.legend(fontsize=8)
    return fig


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=FIGURES, help="folder for the PNG files")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = {
        "bench_norm": (plot_norm, ["bench_norm"]),
        "bench_torch": (plot_torch, ["bench_torch_sweep_2thread", "bench_torch_resnet18_2thread"]),
        "bench_lenet": (plot_lenet, ["bench_lenet"]),
        "bench_zoo": (plot_zoo, ["bench_zoo"]),
        "bench_small": (plot_small, ["bench_small"]),
    }
    for figure, (draw, names) in jobs.items():
        data = [_load(n) for n in names]
        if all(x is None for x in data):
            print(f"{figure}: skipped (no {', '.join(n + '.json' for n in names)})")
            continue
        fig = draw(*data)
        fig.tight_layout()
        path = args.out / f"{figure}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
