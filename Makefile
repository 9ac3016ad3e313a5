# The two commands a newcomer needs: `make run` and `make test`.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8000
PYTHON ?= python3

.PHONY: install run test soak lint seed

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
run: install
	$(BIN)/capy-imports migrate
	$(BIN)/capy-imports dev-seed --port $(PORT)
	$(BIN)/honcho --procfile Procfile.dev start --port $(PORT)

test: install
	$(BIN)/python -m pytest

# 30 imports across 3 workers while a random worker is SIGKILLed every few seconds
# (about 10 minutes; CAPY_SOAK_SEED picks another sequence of kills).
soak: install
	$(BIN)/python -m pytest -m soak -s tests/soak

lint: install
	$(BIN)/ruff check app pipeline stages tests
