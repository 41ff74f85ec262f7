# One entry point per chore. `.ci/run` runs the same commands on a fresh machine.
# Uses the README's virtualenv (.venv) when it exists, else whatever python3 is on PATH.
VENV ?= .venv
BIN := $(if $(wildcard $(VENV)/bin/python),$(VENV)/bin/,)
PYTHON := $(if $(BIN),$(BIN)python,python3)

.PHONY: test lint bench docs-check

## test: the whole suite (README's test command): tests/ and the notebooks.
test:
	$(PYTHON) -m pytest

## lint: ruff, ruff format --check and mypy --strict.
lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy --strict harness_nodes checkpointers

## bench: every benchmark in bench/ (each prints ratios against its own baseline).
bench:
	@set -e; for f in $(filter-out bench/_%,$(wildcard bench/*.py)); do \
		echo "== $$f"; $(PYTHON) $$f; \
	done

## docs-check: the README's and docstrings' python blocks, and the notebooks.
docs-check:
	$(PYTHON) -m pytest tests/test_examples.py $(wildcard notebooks)
