# The two commands of the README:
#   make run    install, then `stella dev`: web, worker and beat on the embedded defaults
#   make test   install, then lint, type-check and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8443
export STELLA_DATA_DIR ?= ./var

.PHONY: install run test check pytest bench bench-quick clean

$(BIN)/stella: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/stella

run: install
	$(BIN)/stella dev --host $(HOST) --port $(PORT)

check: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

# Two test processes (pytest-xdist): each has its own databases, Redis prefixes and
# servers, and most tests wait on real processes, so two halve the time on two cores.
pytest: install
	$(BIN)/pytest -n 2

# bench/README.md: every scenario against real processes (PostgreSQL, Redis).
bench: install
	$(BIN)/python -m bench

bench-quick: install
	$(BIN)/python -m bench --quick

test: check pytest

clean:
	rm -rf $(VENV) build *.egg-info
