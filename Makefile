# The whole set-up: `make demo` and `make test`. Each bootstraps .venv on first use:
# torch's CPU wheel first, then everything else under constraints.txt so no CUDA torch is ever pulled.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_SPEC ?= torch==2.13.0
# Extra pip flags for the torch install, e.g. TORCH_PIP_ARGS="--index-url <your CPU wheel index>".
TORCH_PIP_ARGS ?=
SCRATCH ?= .scratch
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export RAY_AUTH_MODE := disabled
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test lint bench venv clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

venv: $(STAMP)

# The main job: the whole pipeline as a Ray job on a local Ray instance, MLflow on a SQLite file; then the
# model it registered is served (Ray Serve) and one conversation is scored through POST /v1/reward.
# What it prints: a line per stage (live on a terminal), the table, the registration, the served answer; Ray's
# and the workers' lines go to the log file named first. `make demo DEMO_ARGS=--verbose` shows them too.
demo: $(STAMP)
	RAY_TMPDIR=$${RAY_TMPDIR:-/tmp/ray} $(PY) -m jobs.run_pipeline --config configs/demo.yaml $(DEMO_ARGS)
	RAY_TMPDIR=$${RAY_TMPDIR:-/tmp/ray} $(PY) -m serve.demo --config configs/demo.yaml $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) $(SCRATCH)
