# One entry point per task. `make run` and `make test` work on a fresh machine: they create
# the virtual environment and install what is needed first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test lint typecheck unit bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "flowdesk needs Python 3.11+"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## The main job on the embedded default (SQLite file ./flowdesk.db): a worker and sample work.
run: install
	$(PY) examples/orders.py

## The whole suite: lint, types, tests.
test: install lint typecheck
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check src tests examples benchmarks
	$(VENV)/bin/ruff format --check src

typecheck: install
	$(VENV)/bin/mypy

unit: install
	$(PY) -m pytest tests/unit

bench: install
	$(PY) benchmarks/engine.py

clean:
	rm -rf $(VENV) .bench .pytest_cache .mypy_cache .ruff_cache flowdesk.db flowdesk.db-wal flowdesk.db-shm
