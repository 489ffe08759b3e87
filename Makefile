# zeroadamw -- `make demo` (set up + 2-process demo), `make test` (set up + the whole test suite).
# Each target creates the virtual environment if it is missing. Variables:
#   PYTHON=python3.11      interpreter for the venv
#   VENV=.venv             where the venv lives
#   VENV_ARGS=--system-site-packages   reuse an installed (CUDA) torch
#   ZEROADAMW_TORCH="torch==X"         install this torch spec instead of the default (see scripts/install_torch.sh)
PYTHON ?= python3
VENV ?= .venv
VENV_ARGS ?=
BIN := $(VENV)/bin
NPROC ?= 2

.PHONY: setup demo test test-fast bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV_ARGS) $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml scripts/install_torch.sh
	bash scripts/install_torch.sh $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[test,hf,bench]"
	$(BIN)/python -m pip install -q --no-build-isolation "deepspeed>=0.15"
	touch $@

setup: $(VENV)/.installed

demo: setup
	PATH=$(abspath $(BIN)):$$PATH bash launch/cpu_demo.sh

test: setup
	$(BIN)/python -m pytest -q --durations=15

test-fast: setup
	$(BIN)/python -m pytest -q -m "not dist and not slow"

bench: setup
	$(BIN)/python -m pip install -q "bitsandbytes>=0.43"
	$(BIN)/python benchmarks/kernel_bandwidth.py
	$(BIN)/python benchmarks/compare.py
	$(BIN)/python benchmarks/step_throughput.py
	$(BIN)/python benchmarks/memory.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis src/*.egg-info
