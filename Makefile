# One entry point for every task: a fresh clone needs only `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DAGSTER_HOME := $(CURDIR)/.dagster_home
UI_HOST ?= 127.0.0.1
UI_PORT ?= 3000

.DEFAULT_GOAL := help
.PHONY: help venv run ui test check bench bench-scale bench-read-scale clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP) ## Create .venv and install the project with its dev tools

run: $(STAMP) ## Materialize the demo pipeline into data/lancedb and print a summary
	@mkdir -p $(DAGSTER_HOME)
	@test -f $(DAGSTER_HOME)/dagster.yaml || cp deploy/dagster.sqlite.yaml $(DAGSTER_HOME)/dagster.yaml
	@# One process: the digits group and folds, each fold partition, two refreshes of the
	@# growing table, maintenance; then the summary (see perm_assets/demo/run.py for why).
	$(BIN)/python -m perm_assets.demo.run definitions.py

ui: export VIRTUAL_ENV := $(abspath $(VENV))
ui: $(STAMP) ## dg dev: the Dagster webserver and daemon on http://127.0.0.1:3000 (UI_PORT=...)
	@mkdir -p $(DAGSTER_HOME)
	@test -f $(DAGSTER_HOME)/dagster.yaml || cp deploy/dagster.sqlite.yaml $(DAGSTER_HOME)/dagster.yaml
	@# dg dev loads the [tool.dg] project of pyproject.toml: definitions.py, whose demo includes
	@# the YAML-declared assets of perm_assets/demo/defs. Ctrl-C or a SIGTERM to make stops the
	@# webserver, daemon and code server within ~4 s (tests/test_ui_stop.py).
	@# perm_assets.ui execs dg dev with SIGINT and SIGTERM at their defaults: started in the
	@# background of a script (SIGINT ignored), dg dev ignored both.
	$(BIN)/python -m perm_assets.ui --use-active-venv -h $(UI_HOST) -p $(UI_PORT)

test: $(STAMP) ## Run the whole test suite: on both cores, then the wall-clock-bound tests alone
	@# Most tests wait on child processes and servers, so two workers nearly halve the time;
	@# tests marked `serial` assert wall-clock bounds and run after, on a quiet machine.
	$(BIN)/pytest -n 2 --dist loadfile -m "not serial" --durations=15
	$(BIN)/pytest -m serial

check: $(STAMP) ## ruff, ruff format --check, pyright
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pyright

bench: $(STAMP) ## Print build/read figures at 1M and 10M rows (takes minutes)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python bench/bench.py
	$(BIN)/python bench/bench_torch.py
	$(BIN)/python bench/bench_s3.py --rows 1000000
	$(BIN)/python bench/bench_exit.py --rows 10000000 --runs 20
	$(BIN)/python bench/bench_read.py --rows 10000000

# Opt-in billion rows (~16 GB of data, 30-60 min): BENCH_SCALE_ROWS=1000000000 BENCH_SCALE_ARGS=
# "--engines local --build-only --dir /big/disk --keep" (--keep reuses the generated table).
BENCH_SCALE_ROWS ?= 10000000 100000000
BENCH_SCALE_ARGS ?=
bench-scale: $(STAMP) ## Every engine (builder, lancedb, local, ray 1 and 2 workers) at 10M and 100M rows (~40 min)
	$(BIN)/python bench/bench_scale.py --rows $(BENCH_SCALE_ROWS) --folds $(BENCH_SCALE_ARGS)

clean: ## Remove the virtualenv, demo data and Dagster history
	rm -rf $(VENV) data .dagster_home

bench-read-scale: $(STAMP) ## Issue 11's read paths at 100M rows: first batch, rows/s, peak RSS (~25 min, ~4 GB temporary data)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python bench/bench_read.py --rows 100000000 --data-dir $(or $(BENCH_DATA),bench/data/read-scale) --remove-data
