# xfer developer workflow. Every target creates the virtual environment from
# pyproject.toml first, so `make demo` and `make test` work on a fresh clone.
#
#   make demo       the quickstart: embedded S3 + synth + shard + train + score
#   make test       lint, then the default test suite (a few minutes on 2 cores)
#   make test-slow  the slow end-to-end tests (ray job submit, fault recovery, ...)
#   make lint       ruff check + ruff format --check + mypy + terraform fmt -check
#   make bench      the benchmarks; figures go to benchmarks/results/

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
BENCH_IMAGES ?= ../shared/data/cats_vs_dogs
BENCH_WEIGHTS ?= ../shared/weights/mobilenet_v2_1.0_224_imagenet_no_top.h5
BENCH_ARGS ?=
PYTEST_ARGS ?=

.PHONY: install demo test test-slow test-all lint format bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/xfer demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	@if command -v terraform >/dev/null 2>&1; then \
		echo "terraform fmt -check -recursive infra/terraform"; \
		terraform fmt -check -recursive infra/terraform; \
	else \
		echo "terraform not installed: skipping terraform fmt -check (CI runs it)"; \
	fi

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

test-all: lint
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/run_all.py --images $(BENCH_IMAGES) --weights $(BENCH_WEIGHTS) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache build src/*.egg-info
