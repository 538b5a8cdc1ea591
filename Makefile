# `make demo` and `make test` set everything up on a fresh machine (Python >= 3.11).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo demo-seed test lint types unit bench clean browser

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m dataflare.demo

# The seed's DSL reference workflow on embedded stand-ins (broker, fakesnow, HTTP services).
demo-seed: $(STAMP)
	$(BIN)/python -m dataflare.demo_seed

lint: $(STAMP)
	$(BIN)/ruff check dataflare tests bench

types: $(STAMP)
	$(BIN)/mypy

# The console test drives Debian's Chromium (installed here when missing and run as root).
browser:
	@command -v chromium >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || \
	  { export DEBIAN_FRONTEND=noninteractive; apt-get install -y -q chromium >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }; } || \
	  echo "chromium could not be installed: the console test will be skipped"

unit: $(STAMP) browser
	$(BIN)/pytest -q

test: lint types unit

bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) flows/out .pytest_cache .mypy_cache .ruff_cache
