# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
NPM_STAMP := node_modules/.installed
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
HOME_DIR ?= sma-home
PROFILE  ?= cpu

.PHONY: install browser run test lint bench protos protos-release clean

install: $(STAMP) $(NPM_STAMP)

# torch is pinned first: a looser requirement would pull a multi-GB CUDA build. setuptools says
# at length that an editable install of a two-root layout (., protos/) uses an import hook:
# known and intended, so that note is silenced and real warnings still show.
PIP_INSTALL := PYTHONWARNINGS="ignore:Editable installation" $(BIN)/python -m pip install -q
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(PIP_INSTALL) -e '.[dev,demo]'
	touch $(STAMP)

# npm tools (buf, for `buf lint` of protos/) go into ./node_modules, never globally.
$(NPM_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $(NPM_STAMP)

# The UI tests drive Debian's Chromium with Playwright (never a browser download).
browser: $(CHROMIUM)
$(CHROMIUM):
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

$(VENV)/.bench-installed: $(STAMP)
	$(PIP_INSTALL) -e '.[dev,demo,bench]'
	touch $@

# The whole stack: registry, training, inference and gateway on loopback. A first start builds
# the demo corpus if data/general is empty, trains, and serves; later starts serve in seconds.
run: install
	$(BIN)/sma up --home $(HOME_DIR) --profile $(PROFILE)

test: install browser
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

bench: $(VENV)/.bench-installed
	$(BIN)/sma bench --profile $(PROFILE)

# Regenerate the checked-in gRPC stubs after editing protos/sma/v1/*.proto.
protos: install
	node_modules/.bin/buf lint protos
	$(BIN)/python scripts/gen_protos.py

# Record the current wire contract as the last release: `make test` checks every later change
# against it with `buf breaking`.
protos-release: install
	node_modules/.bin/buf build protos -o protos/released.binpb

clean:
	rm -rf $(VENV) node_modules build *.egg-info .pytest_cache .ruff_cache
