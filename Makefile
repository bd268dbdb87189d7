# Each target does its own set-up from a fresh clone: create .venv and install the project into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/limpq run --config jobs/configs/demo.yaml

# CI: everything but the tests marked slow (one end-to-end test of each kind stays unmarked).
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# Every test, the slow fault-injection, multi-node and browser variants too (about 45 min on 2 cores).
test-all: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache mlflow.db mlruns mlartifacts demo_data runs
