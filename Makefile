# The two commands of the README:
#   make run    install, migrate and serve on the embedded defaults (SQLite, HTTPS + mTLS)
#   make test   install, then lint, type-check and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8443
export STELLA_DATA_DIR ?= ./var

.PHONY: install run test check pytest clean

$(BIN)/stella: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/stella

run: install
	@mkdir -p $(STELLA_DATA_DIR)
	@test -n "$$STELLA_ADMIN_TOKEN" || test -s $(STELLA_DATA_DIR)/admin-token || \
		(umask 077 && $(BIN)/python -c 'import secrets; print(secrets.token_urlsafe(32))' > $(STELLA_DATA_DIR)/admin-token)
	$(BIN)/stella db upgrade
	@export STELLA_ADMIN_TOKEN="$${STELLA_ADMIN_TOKEN:-$$(cat $(STELLA_DATA_DIR)/admin-token)}"; \
		echo "admin token: $$STELLA_ADMIN_TOKEN   (CA: $(STELLA_DATA_DIR)/pki/ca.pem)"; \
		exec $(BIN)/stella serve --tls --host $(HOST) --port $(PORT)

check: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

pytest: install
	$(BIN)/pytest

test: check pytest

clean:
	rm -rf $(VENV) build *.egg-info
