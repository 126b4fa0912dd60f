# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HOME_DIR ?= sma-home
PROFILE  ?= cpu

.PHONY: install run test lint bench clean

install: $(STAMP)

# torch is pinned first: a looser requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

$(VENV)/.bench-installed: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	touch $@

# Until the services exist: build the demo corpus if missing, train, then chat in the terminal.
run: install
	$(BIN)/sma corpus demo --home $(HOME_DIR)
	$(BIN)/sma train --home $(HOME_DIR) --profile $(PROFILE)
	$(BIN)/sma generate --home $(HOME_DIR)

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(VENV)/.bench-installed
	$(BIN)/sma bench --profile $(PROFILE)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
