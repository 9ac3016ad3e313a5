# The two commands a newcomer needs: `make run` and `make test` (CI runs `make lint` first).
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8000
PYTHON ?= python3

.PHONY: install run test test-extensions soak lint seed bench

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# Dev mode (CAPY_ENV=development): the public development secret key, and loopback and
# private sources allowed. Production (the default) refuses to start without CAPY_SECRET_KEY.
run: export CAPY_ENV ?= development
run: export PATH := $(CURDIR)/$(BIN):$(PATH)
# Every process of the run (gunicorn's and dramatiq's) writes its metrics here and
# GET /metrics adds them up; emptied at start (README, Metrics).
run: export PROMETHEUS_MULTIPROC_DIR ?= $(CURDIR)/.metrics
run: install
	mkdir -p "$$PROMETHEUS_MULTIPROC_DIR" && rm -f "$$PROMETHEUS_MULTIPROC_DIR"/*.db "$$PROMETHEUS_MULTIPROC_DIR"/*/*.db
	$(BIN)/capy-imports migrate
	$(BIN)/capy-imports dev-seed --port $(PORT)
	$(BIN)/honcho --procfile Procfile.dev start --port $(PORT)

test: install test-extensions
	$(BIN)/python -m pytest

# The tests import sources that use pg_partman, a packaged extension with configuration
# tables (tests/integration/test_hostile_extension_configuration.py), from Debian's
# package for the local PostgreSQL.
PG_MAJOR := $(shell ls /usr/lib/postgresql 2>/dev/null | sort -n | tail -1)
test-extensions:
	@[ -f /usr/share/postgresql/$(PG_MAJOR)/extension/pg_partman.control ] || { \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	        echo "make test: installing postgresql-$(PG_MAJOR)-partman with apt-get"; \
	        DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql-$(PG_MAJOR)-partman \
	        || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql-$(PG_MAJOR)-partman; }; \
	    else \
	        echo "make test: pg_partman is missing: install it as root with \`apt-get install postgresql-$(PG_MAJOR)-partman\`" >&2; \
	        exit 1; \
	    fi; }

# 30 imports across 3 workers while a random worker is SIGKILLed every few seconds
# (a few minutes; CAPY_SOAK_SEED picks another sequence of kills).
soak: install
	$(BIN)/python -m pytest -m soak -s tests/soak

# The copy benchmark (bench/README.md): the service against pg_dump | pg_restore, pg_dump -Fd -j2
# + pg_restore -j2 and pgcopydb on the generated sources. Default: every dataset at scale 1, 3
# rounds (1 to 1.5 hours on 2 cores, plus the sources' first build); options go in BENCH_ARGS, e.g.
# make bench BENCH_ARGS="--datasets mix,tiny --scale 0.3 --rounds 3".
BENCH_ARGS ?=
bench: install
	@command -v pgcopydb >/dev/null || { \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	        echo "make bench: installing pgcopydb with apt-get"; \
	        DEBIAN_FRONTEND=noninteractive apt-get install -y -q pgcopydb || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q pgcopydb; }; \
	    else \
	        echo "make bench: pgcopydb is missing: install it as root with \`apt-get install pgcopydb\` (Debian)," \
	             "or leave it out: BENCH_ARGS=\"--methods dump-pipe,dump-dir-j2,service,restore-j2,service-upload\"" >&2; \
	    fi; }
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m bench $(BENCH_ARGS)

# What CI checks before the tests (README, Tests): lint, formatting, types (mypy's
# configuration, in pyproject.toml, names the packages it checks).
LINT_PATHS := app pipeline stages client tests bench
lint: install
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/mypy
