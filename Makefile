# lightning_recipe: `make demo` and `make test` set everything up on a fresh machine.
# TORCH_SPEC picks the torch build: the local CPU wheel by default; a GPU user passes their own,
# e.g. `make test TORCH_SPEC="torch==2.5.1"` (or TORCH_SPEC= to keep the torch already installed).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test lint format bench clean setup browser clients lightning-tests

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/python -m pip install -q "$(TORCH_SPEC)"; fi
	$(BIN)/python -m pip install -q -e ".[dev,demo]"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lightning-recipe demo

# The browser tests (tests/test_dashboard.py, tests/test_recipe_tab.py) drive headless Chromium.
# `make test` installs it where it is missing and the machine can (Debian/Ubuntu, as root:
# apt-get install -y chromium); elsewhere those tests are skipped with the reason.
# INSTALL_CHROMIUM=0 never installs anything.
INSTALL_CHROMIUM ?= 1
CHROMIUM_NAMES := chromium chromium-browser google-chrome chrome

browser:
	@for c in $(CHROMIUM_NAMES); do command -v $$c >/dev/null 2>&1 && exit 0; done; \
	if [ "$(INSTALL_CHROMIUM)" = 1 ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium for the browser tests (apt-get install -y chromium)"; \
	  (timeout 900 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq chromium) >/dev/null 2>&1 \
	    || echo "note: could not install chromium; the browser tests will be skipped"; \
	else \
	  echo "note: chromium not found (install it as root: apt-get install chromium); the browser tests will be skipped"; \
	fi

test: $(STAMP) browser
	@$(BIN)/python -m pytest -q $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; fi; exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check lightning_recipe lightning_recipe_tensorboard tests examples benchmarks docs clients
	$(BIN)/ruff format --check lightning_recipe lightning_recipe_tensorboard tests examples benchmarks docs clients

format: $(STAMP)
	$(BIN)/ruff format lightning_recipe lightning_recipe_tensorboard tests examples benchmarks docs clients
	$(BIN)/ruff check --fix lightning_recipe lightning_recipe_tensorboard tests examples benchmarks docs clients

bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py

# The third-party corpus (README "Third-party models"): real libraries' models, each trained a few
# epochs with the suite at defaults, in a separate venv so that they never touch $(VENV).
# Torch goes in first; clients/_guard.py refuses any library set that would replace it.
CLIENTS_VENV ?= .venv-clients
CLIENTS_BIN := $(CLIENTS_VENV)/bin
CLIENTS_STAMP := $(CLIENTS_VENV)/.installed
CLIENTS_ARGS ?=

$(CLIENTS_STAMP): pyproject.toml clients/requirements.txt
	@test -x $(CLIENTS_BIN)/python || $(PYTHON) -m venv $(CLIENTS_VENV)
	$(CLIENTS_BIN)/python -m pip install -q --upgrade pip
	@if [ -n "$(TORCH_SPEC)" ]; then $(CLIENTS_BIN)/python -m pip install -q "$(TORCH_SPEC)"; fi
	$(CLIENTS_BIN)/python -m pip install -q -e .
	$(CLIENTS_BIN)/python -m pip install -q --dry-run --report $(CLIENTS_VENV)/dry-run.json -r clients/requirements.txt
	$(CLIENTS_BIN)/python clients/_guard.py $(CLIENTS_VENV)/dry-run.json
	$(CLIENTS_BIN)/python -m pip install -q -r clients/requirements.txt
	@touch $(CLIENTS_STAMP)

clients: $(CLIENTS_STAMP)
	$(CLIENTS_BIN)/python clients/run.py $(CLIENTS_ARGS)

# Lightning's own tests (loops, trainer, loggers) with the full suite added to every Trainer
# (clients/lightning_tests/): 0 internal-error findings is the target. They need a checkout of
# Lightning's repository (the PyPI packages ship no tests): cloned into $(LIGHTNING_SRC) at
# $(LIGHTNING_REF) when missing (github.com must be reachable then), or pass LIGHTNING_SRC=<checkout>.
LIGHTNING_SRC ?= .lightning-src
LIGHTNING_REF ?= 2.6.5
LT_VENV ?= .venv-lightning-tests
LT_STAMP := $(LT_VENV)/.installed

$(LT_STAMP): $(STAMP)
	@test -x $(LT_VENV)/bin/python || $(PYTHON) -m venv $(LT_VENV)
	$(LT_VENV)/bin/python -m pip install -q --upgrade pip
	@if [ -n "$(TORCH_SPEC)" ]; then $(LT_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"; fi
	$(LT_VENV)/bin/python -m pip install -q -e . "lightning==$$($(BIN)/python -c 'import lightning; print(lightning.__version__)')" \
	  pytest pytest-timeout cloudpickle scikit-learn pandas psutil tensorboard torchmetrics
	@touch $(LT_STAMP)

lightning-tests: $(LT_STAMP)
	@test -d $(LIGHTNING_SRC)/tests/tests_pytorch || git clone -q --depth 1 --branch $(LIGHTNING_REF) \
	  https://github.com/Lightning-AI/pytorch-lightning $(LIGHTNING_SRC)
	$(LT_VENV)/bin/python clients/lightning_tests/run.py --src $(LIGHTNING_SRC)

clean:
	rm -rf $(VENV) recipe_runs lightning_logs .pytest_cache
