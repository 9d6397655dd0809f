# Two commands do all set-up: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast browser lint bench lock clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tally demo

# The dashboard's real-browser test drives Debian's chromium (never a browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "chromium not installed: the real-browser test will be skipped"; }

test: $(STAMP) browser
	$(BIN)/ruff check tally tests bench dashboard docs
	$(BIN)/python -m pytest -q tests

# The fast tier: no Ray, no training beyond seconds, no browser (about 2 minutes).
test-fast: $(STAMP)
	$(BIN)/ruff check tally tests bench dashboard docs
	$(BIN)/python -m pytest -q -m "not slow and not browser" tests

lint: $(STAMP)
	$(BIN)/ruff check tally tests bench dashboard docs

bench: $(STAMP)
	$(BIN)/python bench/evaluator.py
	$(BIN)/python bench/train_step.py --quick

# constraints.txt: the versions of everything CI passed with (its venv has the dev, onnx and wilds
# extras), for `pip install -c constraints.txt -e '.[dev]'`. Left out: torch's CUDA wheels (nvidia-*,
# cuda-*, triton), which torch's own pin chooses per platform and which do not exist on every one.
lock: $(STAMP)
	{ echo "# make lock: pip freeze of the venv CI passed with (refresh after changing pyproject.toml)"; \
	  $(BIN)/pip freeze --exclude-editable | grep -viE '^(nvidia-|cuda-|triton==)'; } > constraints.txt

clean:
	rm -rf $(VENV) results .pytest_cache
