# The two commands of the README: `make repro` (pipeline end to end) and `make test` (the test suite).
# Both create .venv and install the pinned dependencies first (once; again when requirements change).
PYTHON ?= python3
VENV   := .venv
BIN    := $(CURDIR)/$(VENV)/bin
STAMP  := $(VENV)/.installed
export PATH := $(BIN):$(PATH)
export PIP_DISABLE_PIP_VERSION_CHECK := 1
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
QUIET := { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: install repro queue test mlflow-ui clean

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements.txt 2>&1 | $(QUIET)
	$(BIN)/python -m pip install -q --no-deps -e . 2>&1 | $(QUIET)
	$(BIN)/python -c "import latentzoo, torch, ray, dvc, mlflow, webdataset"
	touch $(STAMP)

# Run the whole DAG on params.yaml, every stage connected to one local Ray head (unless RAY_ADDRESS is set).
repro: $(STAMP)
	$(BIN)/python -m latentzoo.local_cluster -- $(BIN)/dvc repro

# Run the experiments queued with `dvc exp run --queue -S ...`, JOBS at a time, on one local Ray head, and wait.
# (DVC's queue workers start `dvc` by name: it must be the venv's, which make puts first on PATH.)
JOBS ?= 1
queue: $(STAMP)
	$(BIN)/python -m latentzoo.local_cluster -- $(BIN)/dvc exp run --run-all -j $(JOBS)

# The test suite (.ci/run runs it under a fresh HOME, then `make repro` and a no-op `dvc repro`): first in
# TEST_WORKERS processes (pytest-xdist), each taking a whole test file at a time, in the order tests/conftest.py
# gives (the slowest first); then the elastic-training test (marked `alone`) on its own, as its node's join and
# drain deadlines want a machine that is not also running the rest. TEST_WORKERS=0: all in this process.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q --timeout=600
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(PYTEST) --durations=30 -m "not alone" -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
	$(PYTEST) --durations=5 -m alone

# Browse runs: http://127.0.0.1:5000/#/experiments (MLFLOW_PORT=... for another port)
MLFLOW_PORT ?= 5000
mlflow-ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port $(MLFLOW_PORT)

clean:
	rm -rf data/prepared data/shards models metrics plots reports .ray_results
