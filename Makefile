# Two entry points for a fresh clone: `make run` and `make test`. Both build .venv themselves.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run demo test lint typecheck pytest pythons replay bench fuzz attack conformance clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "make: $(PYTHON) not found (set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	D3K2_ENV=$${D3K2_ENV:-dev} $(BIN)/d3k2 serve --host $${D3K2_HOST:-127.0.0.1} --port $${D3K2_PORT:-8080}

# d3k2 and a local FHIR R4 server (sekmet-fhir) with demo patients, ready for the CDS Hooks sandbox: prints the
# sandbox URL of each patient; Ctrl-C stops both. Ports: D3K2_DEMO_PORT (8080), D3K2_DEMO_FHIR_PORT (8090).
demo: $(STAMP)
	$(BIN)/python tools/demo.py

lint: $(STAMP)
	$(BIN)/ruff check service tests tools
	$(BIN)/ruff format --check service tests tools
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

# Branch coverage: the package at ≥ 90 %; the pure core (facts, rules, cards and what they read) at 100 %.
CORE_COVERAGE ?= 100
CORE := service/d3k2/core/*

pytest: $(STAMP)
	$(BIN)/python -m pytest --cov=d3k2 --cov-branch --cov-report=term-missing:skip-covered --cov-fail-under=90
	$(BIN)/coverage report --include='$(CORE)' --fail-under=$(CORE_COVERAGE)

# Longer schemathesis and hypothesis runs (minutes); `make test` runs the same tests bounded.
fuzz: $(STAMP)
	D3K2_FUZZ_EXAMPLES=$${D3K2_FUZZ_EXAMPLES:-1000} D3K2_PROPERTY_EXAMPLES=$${D3K2_PROPERTY_EXAMPLES:-3000} \
	  $(BIN)/python -m pytest -p no:cacheprovider tests/http/test_schemathesis.py tests/unit/test_properties.py \
	  tests/unit/test_thresholds.py

# The pre-launch attack of issue 24, replayed (a few minutes): each class of tests/http/test_attack.py with
# more examples, the edge (gunicorn, nginx, slow clients), the log checks, feedback through database outages
# and killed workers, and both fuzzers; zero 5xx, no token or patient data in any log line, zero
# acknowledged-but-lost feedback. `make test` runs the same tests bounded.
ATTACK_EXAMPLES ?= 100
attack: $(STAMP)
	D3K2_ATTACK_EXAMPLES=$(ATTACK_EXAMPLES) D3K2_FUZZ_EXAMPLES=$(ATTACK_EXAMPLES) \
	  D3K2_PROPERTY_EXAMPLES=$$(( $(ATTACK_EXAMPLES) * 3 )) \
	  $(BIN)/python -m pytest -q -p no:cacheprovider tests/http/test_attack.py tests/integration/test_edge.py \
	    tests/http/test_hardening.py tests/http/test_logs_no_phi.py tests/integration/test_feedback_durable.py \
	    tests/http/test_schemathesis.py \
	    tests/unit/test_properties.py

# CDS Hooks 2.0.1 service-side MUST/SHOULD statements, each with the tests that prove it.
conformance: $(STAMP)
	$(BIN)/python tools/conformance.py

test: lint typecheck pytest pythons

# The suite again under the other Pythons that pyproject.toml admits, each in its own .venv-3.X (no coverage:
# `pytest` measured it). Found on PATH or among pyenv's versions; one that is missing is reported loudly.
PYTHONS ?= python3.12 python3.13
pythons: $(STAMP)
	@for py in $(PYTHONS); do \
	  exe=$$($$py -c "import sys; print(sys.executable)" 2>/dev/null); \
	  if [ -z "$$exe" ] && command -v pyenv >/dev/null 2>&1; then \
	    exe=$$(ls -d "$$(pyenv root)"/versions/$${py#python}.*/bin/$$py 2>/dev/null | sort -V | tail -n 1); \
	  fi; \
	  if [ -z "$$exe" ]; then echo "make pythons: $$py is not installed: NOT TESTED"; continue; fi; \
	  venv=.venv-$${py#python}; \
	  test -x $$venv/bin/python || $$exe -m venv $$venv || exit 1; \
	  $$venv/bin/python -m pip install --quiet --upgrade pip && $$venv/bin/python -m pip install --quiet -e '.[dev]' || exit 1; \
	  echo "make pythons: the suite under $$($$venv/bin/python -V)"; \
	  $$venv/bin/python -m pytest -q -p no:cacheprovider || exit 1; \
	done

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
	rm -rf $(VENV) .venv-3.* .mypy_cache .ruff_cache .pytest_cache .import_linter_cache
