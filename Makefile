# Everyday targets. `make demo` and `make test` set up .venv/ on a fresh machine first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO := runs/demo
export MAX_JOBS ?= 2
# test files run in parallel, one file per worker (its module fixtures, e.g. a shared run, stay on one),
# the longest first (tests/conftest.py)
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -ra -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15

.PHONY: help install demo test test-fast test-integration lint format bench gpu-wheels gpu-check-dry-run clean

help:
	@echo "make demo      set up .venv, pack a synthetic set, pretrain on 2 CPU ranks, probe"
	@echo "make test      set up .venv and run the test suite"
	@echo "make test-fast every unit test (the tests not marked slow: no launcher, no process runs)"
	@echo "make test-integration  the tests marked slow: launcher, multi-process and whole-command runs"
	@echo "make lint      ruff check + format check"
	@echo "make format    ruff format + autofix"
	@echo "make bench     CPU-sized benchmarks (writes bench/results/)"
	@echo "make gpu-wheels         wheels a registry-less GPU node lacks, split into parts (.whl/)"
	@echo "make gpu-check-dry-run  every stage of bench/gpu_check.sh at CPU size, and the GPU commands"

# --system-site-packages: a machine that already has torch/torchvision (a GPU node image) keeps
# them; elsewhere torchvision pulls the torch build it matches. The editable install builds the
# csrc/ extension against that torch (hence --no-build-isolation).
$(STAMP): setup.py $(wildcard csrc/*)
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel ninja
	$(PY) -m pip install --quiet torchvision
	$(PY) -m pip install --quiet --no-build-isolation -e ".[all]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m data_tools.synthetic_dataset $(DEMO)/data --overwrite
	DS_ACCELERATOR=cpu $(VENV)/bin/deepspeed --num_gpus 2 launch/pretrain.py --config configs/demo.yaml --overwrite
	$(PY) launch/knn_check.py --run $(DEMO)/pretrain

test: $(STAMP)
	$(PYTEST)

test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

test-integration: $(STAMP)
	$(PYTEST) -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(PY) bench/xcorr.py --sizes small
	$(PY) bench/data_pipeline.py --samples 256

gpu-wheels: $(STAMP)
	$(PY) bench/gpu_wheels.py --out .whl

gpu-check-dry-run: $(STAMP)
	PYTHON=$(PY) bash bench/gpu_check.sh --dry-run runs/gpu_check_dry_run

clean:
	rm -rf build *.egg-info runs .pytest_cache .ruff_cache
