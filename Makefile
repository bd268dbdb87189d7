# Each target does its own set-up from a fresh clone: create .venv and install the project into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Every package at the version the tests passed with (generated from pyproject.toml by `make lock`).
LOCK := requirements.lock

.PHONY: demo test test-all install lock clean

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# After changing dependencies in pyproject.toml: pin them again, keeping the installed versions where
# they still satisfy it (then `make test`, and commit both files).
lock: $(STAMP)
	$(BIN)/python -m pip install --quiet pip-tools
	$(BIN)/python -m pip freeze --exclude-editable > $(VENV)/installed.txt
	$(BIN)/pip-compile --quiet --extra test --strip-extras --no-emit-index-url --no-emit-find-links \
		--constraint $(VENV)/installed.txt --output-file $(LOCK) pyproject.toml

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
