# zeroadamw -- `make demo` (set up what the demo needs + 2-process demo), `make test` (set up everything + the whole
# test suite). Each target creates the virtual environment if it is missing; separate stamps, so `make test` after
# `make demo` installs only the rest. Variables:
#   PYTHON=python3.11      interpreter for the venv
#   VENV=.venv             where the venv lives
#   VENV_ARGS=--system-site-packages   reuse an installed (CUDA) torch
#   ZEROADAMW_TORCH="torch==X"         install this torch spec instead of the default (see scripts/install_torch.sh)
PYTHON ?= python3
VENV ?= .venv
VENV_ARGS ?=
BIN := $(VENV)/bin
NPROC ?= 2

.PHONY: setup setup-demo demo test test-fast bench clean

$(BIN)/python:
	@echo "make: creating the virtual environment $(VENV)"
	$(PYTHON) -m venv $(VENV_ARGS) $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# numpy first: torch imported without it warns "Failed to initialize NumPy" (install_torch.sh imports torch)
$(VENV)/.torch-installed: $(BIN)/python scripts/install_torch.sh
	@echo "make: installing numpy and torch (keeps an importable torch; else CUDA torch with a GPU, CPU torch without)"
	$(BIN)/python -m pip install -q numpy
	bash scripts/install_torch.sh $(BIN)/python
	touch $@

# what the demo needs: the package + transformers, accelerate, safetensors, matplotlib (no test tools, no DeepSpeed)
$(VENV)/.demo-installed: $(VENV)/.torch-installed pyproject.toml
	@echo "make: installing zeroadamw[demo] (transformers, accelerate, safetensors, matplotlib; ~1 min)"
	$(BIN)/python -m pip install -q -e ".[demo]"
	touch $@

# what the whole test suite needs: + the test, hf and bench extras and DeepSpeed (~1.7 GB venv)
$(VENV)/.installed: $(VENV)/.torch-installed pyproject.toml
	@echo "make: installing zeroadamw[test,hf,bench] and DeepSpeed (what the test suite needs; a few minutes)"
	$(BIN)/python -m pip install -q -e ".[test,hf,bench]"
	$(BIN)/python -m pip install -q --no-build-isolation "deepspeed>=0.15"
	touch $@

setup: $(VENV)/.installed

setup-demo: $(VENV)/.demo-installed

demo: setup-demo
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
