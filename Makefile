# The two set-up commands. Both work from a fresh clone with only Python 3.11 and pip.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint clean

demo: $(VENV)/.installed  ## create .venv, install vlm, run the demo
	$(BIN)/vlm demo --out runs/demo

test: $(VENV)/.installed-dev  ## create .venv, install vlm with dev extras, lint, run the tests
	$(BIN)/ruff check .
	$(BIN)/pytest -q

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install -e '.[dev]'
	touch $@ $(VENV)/.installed

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache *.egg-info
