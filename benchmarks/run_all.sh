#!/usr/bin/env bash
# Every benchmark behind docs/benchmarks.md and the README, in the order they are documented;
# JSON in benchmarks/results/, figures in docs/figures/bench_*.png. About an hour on 2 cores.
# Run it on a quiet machine: each script records the load average next to its numbers.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export OMP_WAIT_POLICY=PASSIVE  # as bnlab.torch sets it; see docs/torch.md
$PY benchmarks/bench_norm.py --name bench_norm
$PY benchmarks/bench_small.py
$PY benchmarks/bench_torch.py --threads 2 --repeats 21 --json benchmarks/results/bench_torch_2thread.json
$PY benchmarks/bench_torch.py --resnet18 --threads 2 --repeats 15 --json benchmarks/results/bench_torch_resnet18_2thread.json
$PY benchmarks/bench_torch.py --sweep --threads 2 --repeats 9 --json benchmarks/results/bench_torch_sweep_2thread.json
$PY benchmarks/bench_torch.py --sweep-compiled --threads 2 --repeats 9 --json benchmarks/results/bench_torch_sweep_compiled_2thread.json
env -u OMP_WAIT_POLICY $PY benchmarks/bench_lenet.py --rounds 5 --pinned 1
env -u OMP_WAIT_POLICY $PY benchmarks/bench_zoo.py --quiet-below 1.5
env -u OMP_WAIT_POLICY $PY benchmarks/bench_clients.py
$PY benchmarks/plot_results.py
