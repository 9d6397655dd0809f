# Two commands do all set-up: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tally demo

test: $(STAMP)
	$(BIN)/ruff check tally tests bench dashboard
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python bench/evaluator.py

clean:
	rm -rf $(VENV) results .pytest_cache
