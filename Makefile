# Two entry points for a fresh clone: `make run` and `make test`. Both build .venv themselves.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint typecheck pytest replay bench clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "make: $(PYTHON) not found (set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	D3K2_ENV=$${D3K2_ENV:-dev} $(BIN)/d3k2 serve --host $${D3K2_HOST:-127.0.0.1} --port $${D3K2_PORT:-8080}

lint: $(STAMP)
	$(BIN)/ruff check service tests tools
	$(BIN)/ruff format --check service tests tools

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/python -m pytest

test: lint typecheck pytest

replay: $(STAMP)
	$(BIN)/d3k2 replay fixtures

# d3k2 against a bare Flask ceiling under the same gunicorn and wrk (≈ 1.5 min); see BENCHMARKS.md.
# Never part of `make test`: speed is measured here, not asserted in tests.
bench: $(STAMP)
	@command -v wrk >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "make bench: installing wrk with apt-get"; \
	    apt-get update -qq && apt-get install -y -qq wrk >/dev/null || exit 1; \
	  else \
	    echo "make bench: wrk is missing; install it (Debian/Ubuntu: sudo apt-get install wrk) and rerun"; exit 1; \
	  fi; }
	cd bench && ../$(BIN)/python run.py --json results.json

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
