# xfer developer workflow. Every target creates the virtual environment from
# pyproject.toml first, so `make demo` and `make test` work on a fresh clone.
#
#   make demo       the quickstart: embedded S3 + synth + shard + train + score
#   make test       lint, then the default test suite (a few minutes on 2 cores)
#   make test-slow  the slow end-to-end tests (ray job submit, fault recovery, ...)
#   make test-all   both (what CI runs); the image test is `make image-test`
#   make lint       ruff check + ruff format --check + mypy + terraform fmt -check
#   make bench      the benchmarks; figures go to benchmarks/results/
#   make capacity   what 1M, 10M and 100M images a night take (docs/capacity.md)
#   make image      the job image (infra/Dockerfile) with docker or podman, tagged with
#                   the commit: xfer-job:<12 hex>[-dirty]
#   make image-test that image built on a base made offline, then a smoke test inside
#                   it as uid 1000 (podman, runc, debootstrap; about 6 minutes)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
BENCH_IMAGES ?= ../shared/data/cats_vs_dogs
BENCH_WEIGHTS ?= ../shared/weights/mobilenet_v2_1.0_224_imagenet_no_top.h5
BENCH_ARGS ?=
CAPACITY_ARGS ?= --images 1M,10M,100M --deadline 6h
PYTEST_ARGS ?=

IMAGE ?= xfer-job
IMAGE_COMMIT = $(shell git rev-parse HEAD)$(shell git diff --quiet HEAD -- || echo -dirty)
IMAGE_TAG ?= $(shell git rev-parse --short=12 HEAD)$(shell git diff --quiet HEAD -- || echo -dirty)
# Whichever works: docker with a running engine, else podman.
CONTAINER_ENGINE ?= $(shell if docker info >/dev/null 2>&1; then echo docker; \
	elif command -v podman >/dev/null 2>&1; then echo podman; fi)
IMAGE_BUILD_ARGS ?=

.PHONY: install demo test test-slow test-all lint format bench capacity image image-test clean

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
	$(PY) -m pytest -m "slow and not image" $(PYTEST_ARGS)

test-all: lint
	$(PY) -m pytest -m "not image" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/run_all.py --images $(BENCH_IMAGES) --weights $(BENCH_WEIGHTS) $(BENCH_ARGS)

capacity: $(STAMP)
	$(PY) benchmarks/capacity.py $(CAPACITY_ARGS)

image:
	@test -n "$(CONTAINER_ENGINE)" || { echo "make image: no docker engine and no podman here" >&2; exit 2; }
	$(CONTAINER_ENGINE) build -f infra/Dockerfile -t $(IMAGE):$(IMAGE_TAG) \
		--build-arg XFER_GIT_COMMIT=$(IMAGE_COMMIT) $(IMAGE_BUILD_ARGS) .

image-test: $(STAMP)
	infra/image-test/run.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache build src/*.egg-info
