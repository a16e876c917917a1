# bnlab: `make demo` and `make test` are all a fresh machine needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BNLAB := $(VENV)/bin/bnlab
STAMP := $(VENV)/.bnlab-installed
PYTEST_ARGS ?= -n 2

.PHONY: setup data demo test check experiments reliability bench lint clean

setup: $(STAMP) data

# The torch extra pins torch==2.13.0 (a CPU build); an unpinned torch would pull CUDA.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[torch,dev,plots]'
	touch $(STAMP)

data:
	@bash scripts/ensure-data.sh

demo: setup
	$(BNLAB) train --model lenet-bn --epochs 10 --batch-size 256 --lr 1.0 --seed 0 --out runs/demo --overwrite
	@echo "Report: runs/demo/report.md (metrics: runs/demo/metrics.json)"

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

check: setup
	$(BNLAB) check

experiments: setup
	$(BNLAB) experiment all --quick --out reports

reliability: setup
	$(PY) tests/reliability/report.py

bench: setup
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[bench]'
	PY=$(PY) bash benchmarks/run_all.sh

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
