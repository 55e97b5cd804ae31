# `make demo` and `make test` work from a fresh clone: both create .venv on first use.
# The demo needs the runtime dependencies only; the tests add the `dev` extra (pytest and the
# torch + transformers oracles, a few GB) and the `mlperf` extra (LoadGen, for the harness's
# test), so `make demo` never installs those.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNTIME_STAMP := $(VENV)/.installed-runtime
DEV_STAMP := $(VENV)/.installed-dev
PIP := $(BIN)/pip install --quiet --disable-pip-version-check
# Test processes (pytest-xdist): 2 halves the suite's time on 2 cores (TF's compile and start-up are
# mostly single-threaded); each holds TF and the torch oracles (~3 GB), so more needs the memory.
TEST_WORKERS ?= 2

.PHONY: demo test bench clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(RUNTIME_STAMP): pyproject.toml | $(BIN)/python
	$(PIP) -e .
	touch $@

$(DEV_STAMP): $(RUNTIME_STAMP)
	$(PIP) -e '.[dev,mlperf]'
	touch $@

demo: $(RUNTIME_STAMP)
	$(BIN)/python demo.py

test: $(DEV_STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

clean-venv:
	rm -rf $(VENV)
