# lightning_recipe: `make demo` and `make test` set everything up on a fresh machine.
# TORCH_SPEC picks the torch build: the local CPU wheel by default; a GPU user passes their own,
# e.g. `make test TORCH_SPEC="torch==2.5.1"` (or TORCH_SPEC= to keep the torch already installed).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test lint format bench clean setup

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/python -m pip install -q "$(TORCH_SPEC)"; fi
	$(BIN)/python -m pip install -q -e ".[dev,demo]"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lightning-recipe demo

# The dashboard test drives headless Chromium when it is installed; without it that part is
# skipped with its reason. Install it with: apt-get install chromium
test: $(STAMP)
	@command -v chromium >/dev/null 2>&1 || echo "note: chromium not found, the browser part of tests/test_dashboard.py will be skipped (apt-get install chromium)"
	@$(BIN)/python -m pytest -q $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; fi; exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check lightning_recipe tests examples benchmarks docs
	$(BIN)/ruff format --check lightning_recipe tests examples benchmarks docs

format: $(STAMP)
	$(BIN)/ruff format lightning_recipe tests examples benchmarks docs
	$(BIN)/ruff check --fix lightning_recipe tests examples benchmarks docs

bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) recipe_runs lightning_logs .pytest_cache
