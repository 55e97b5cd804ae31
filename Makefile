# `make demo` and `make test` work from a fresh clone: both create .venv on first use.
# The demo needs the runtime dependencies only; the tests add the `dev` extra (pytest and the
# torch + transformers oracles, a few GB), the `mlperf` extra (LoadGen, for the harness's
# test) and the `triton` extra (PyTriton and tritonclient, for serving.triton's tests), so
# `make demo` never installs those.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNTIME_STAMP := $(VENV)/.installed-runtime
DEV_STAMP := $(VENV)/.installed-dev
PIP := $(BIN)/pip install --quiet --disable-pip-version-check
# Test processes (pytest-xdist). On 2 cores, 3 beat 2: workers also wait (on the processes some
# tests start, on servers coming up), so 2 kept the cores 172% busy and 3 keep them 185%:
# 690 tests in 11 min 44 s against 13 min 41 s (AMD EPYC, 2 cores, 2026-12-07). Each holds TF
# and the torch oracles (~3 GB); 3 fit in 24 GB. TEST_WORKERS=2 where memory is tighter.
TEST_WORKERS ?= 3
# PyTriton goes in without its dependencies (the `triton` extra lists them): its metadata pins
# numpy<2 and protobuf<7, which would downgrade TensorFlow's. Its C++ stub, the part that needs
# NumPy 1, runs in the environment serving.triton_env makes (serving/triton_env.py says why).
PYTRITON := nvidia-pytriton==0.7.0

.PHONY: demo test bench clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(RUNTIME_STAMP): pyproject.toml | $(BIN)/python
	$(PIP) -e .
	touch $@

$(DEV_STAMP): $(RUNTIME_STAMP)
	$(PIP) -e '.[dev,mlperf,triton]'
	$(PIP) --no-deps $(PYTRITON)
	$(BIN)/python -m serving.triton_env
	touch $@

demo: $(RUNTIME_STAMP)
	$(BIN)/python demo.py

test: $(DEV_STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

clean-venv:
	rm -rf $(VENV)
