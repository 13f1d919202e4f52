# The two commands a newcomer runs: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev,hf,service,eval,track

.PHONY: setup demo test test-all lint bench bench-setup clean

setup: $(VENV)/.installed

# torch is pinned to the CPU build first, so the package's `torch>=2.4` is already satisfied.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

demo: setup
	$(VENV)/bin/distill run

test: setup
	$(PY) -m pytest -q -n 2 -m "not slow"

test-all: setup
	$(PY) -m pytest -q -n 2

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy

bench: setup
	$(PY) benchmarks/kd_overhead.py
	$(PY) benchmarks/soft_targets.py

# The peers of the benchmarks (the `bench` extra, and torchdistill without its torchvision requirement, which would
# replace the CPU build of torch); prints the torch build it leaves.
bench-setup: setup
	$(PY) -m pip install --quiet -e '.[$(EXTRAS),bench]'
	$(PY) -m pip install --quiet --no-deps 'torchdistill==1.1.5'
	$(PY) -c "import sys, torch, torchdistill.losses.mid_level; print('torch', torch.__version__, '(torchvision imported)' if 'torchvision' in sys.modules else '')"

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
