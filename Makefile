# Two commands on a fresh clone:  `make pipeline`  and  `make test`.
# Both create / update the virtual environment in .venv first (idempotent: pip runs again only
# when pyproject.toml changes).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Stage commands call `python`; put the venv first so they get its interpreter and packages.
export PATH := $(abspath $(BIN)):$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: pipeline test test-fast lint install clean-venv

pipeline: $(STAMP)  ## run ingest -> validate -> split -> train -> evaluate on params.yaml
	@git rev-parse --git-dir >/dev/null 2>&1 || { git init -q && git add -A && git -c user.name=imgcls -c user.email=imgcls@localhost commit -qm "initial"; }
	$(BIN)/dvc repro
	@$(BIN)/imgcls summary

test: $(STAMP)  ## the whole test suite, slow end-to-end tests included (what CI runs)
	$(BIN)/python -m pytest -n 2 --dist loadgroup

test-fast: $(STAMP)  ## everything but the slow end-to-end tests
	$(BIN)/python -m pytest -n 2 -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests pipeline bench
	$(BIN)/ruff format --check src tests pipeline bench

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

clean-venv:
	rm -rf $(VENV)
