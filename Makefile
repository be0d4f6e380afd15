# The two set-up commands. Both work from a fresh clone with only Python 3.11 and pip.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

CONSTRAINTS := constraints.txt
PIP_INSTALL := $(BIN)/pip install -c $(CONSTRAINTS)

.PHONY: demo test lint lock clean

demo: $(VENV)/.installed  ## create .venv, install vlm, run the demo
	$(BIN)/vlm demo --out runs/demo

test: $(VENV)/.installed-dev  ## create .venv, install vlm with dev extras, lint, run the tests
	$(BIN)/ruff check .
	$(BIN)/pytest -q

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# Installs take the versions pinned in constraints.txt, so a fresh machine gets what the tests
# passed with.
$(VENV)/.installed: pyproject.toml $(CONSTRAINTS) | $(VENV)/bin/python
	$(PIP_INSTALL) -e .
	touch $@

# The tests need the lmms extra too: tests/test_lmms_eval.py runs lmms-eval's CLI on a vlm model.
$(VENV)/.installed-dev: pyproject.toml $(CONSTRAINTS) | $(VENV)/bin/python
	$(PIP_INSTALL) -e '.[dev,lmms]'
	touch $@ $(VENV)/.installed

# Re-resolves every dependency to the newest versions pyproject.toml allows, in a scratch venv,
# and rewrites constraints.txt. Then run `make test` and `make demo` and update the README's figures.
# The extras resolve together, so that one constraints.txt installs `.[dev]`, `.[lmms]` or both.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q -e '.[dev,lmms]'
	{ echo "# The versions \`make\` installs (pip install -c constraints.txt): what the tests and the README's"; \
	  echo "# figures were last run with. Upgrade with \`make lock\` (README, \"Upgrading dependencies\")."; \
	  .venv-lock/bin/pip freeze --exclude-editable | grep -v '^vlm=='; } > $(CONSTRAINTS)
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) .venv-lock runs build .pytest_cache .ruff_cache *.egg-info
