# Two commands on a fresh machine: `make up` runs the stack, `make test` runs the checks and tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: up test lint bench bench-e2e clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# What running needs (`make up`); the test tools come with `make test` only.
$(STAMP): pyproject.toml | $(BIN)/python
	CME_PURE_PYTHON=1 $(BIN)/python -m pip install --quiet -e .  # the core is compiled below, once
	touch $(STAMP)

# The test extras of pyproject.toml, installed on their own: reinstalling the project here could
# replace the compiled core with the pure build. Then the engines `cme bench peers` compares with, so
# that their adapters' tests run (7 s here; one is an sdist that needs a C++ compiler): where they
# cannot install, those tests skip and say why.
TEST_STAMP := $(VENV)/.installed-test
# $(call extra,NAME): write the requirements of pyproject.toml's optional-dependencies NAME, a line each,
# to $(VENV)/NAME-requirements.txt.
extra = $(BIN)/python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['$(1)']))" > $(VENV)/$(1)-requirements.txt
$(TEST_STAMP): pyproject.toml | $(STAMP)
	$(call extra,test)
	$(BIN)/python -m pip install --quiet -r $(VENV)/test-requirements.txt
	$(call extra,peers)
	$(BIN)/python -m pip install --quiet -r $(VENV)/peers-requirements.txt \
		|| echo "WARNING: the [peers] engines did not install; tests/bench/test_bench_peers.py skips their tests"
	touch $(TEST_STAMP)

# The compiled core and renderer (setup.py: mypyc, next to the sources). Rebuilt when their sources
# change; a build that cannot compile leaves the pure modules in use (shared/build.py picks).
CORE_STAMP := $(VENV)/.core-built
$(CORE_STAMP): services/matcher/book.py services/matcher/balances.py services/matcher/engine.py shared/decimals.py shared/wire.py setup.py | $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(CORE_STAMP)

up: $(CORE_STAMP)
	$(BIN)/cme up $(ARGS)

lint: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Prometheus (Debian's package, with promtool) backs the metrics tests, Chromium and chromedriver the
# trading page's browser tests; each script installs its package when it is missing and the machine
# allows it, and says loudly when it cannot (those tests then skip).
# The core suite and the renderer's tests run twice: against the compiled build (in the full run) and
# the pure one.
test: lint $(CORE_STAMP)
	bash deploy/install-prometheus.sh
	bash deploy/install-haproxy.sh
	bash deploy/install-chromium.sh
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	CME_PURE_PYTHON=1 $(BIN)/python -m pytest -q tests/core tests/shared/test_decimals.py tests/shared/test_wire.py $(PYTEST_ARGS)

bench: $(CORE_STAMP)
	$(BIN)/cme bench core $(ARGS)

bench-e2e: $(STAMP)
	$(BIN)/cme bench e2e $(ARGS)

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache build services/matcher/*.so shared/*.so
