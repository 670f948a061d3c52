# Set-up and the two everyday commands. Every target installs what it needs into .venv first.
#   make demo   - the whole pipeline on the embedded default (tiny model, synthetic videos)
#   make test   - the full test suite (make test-quick skips the slow multi-process end-to-end tests)
#   make lint   - ruff over the tree (configured in pyproject.toml)
# TORCH_SPEC picks the torch build: the default is the CPU wheel this machine type carries; on a GPU machine use
# e.g. `make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
DEMO_OUT ?= demo_out

.PHONY: setup demo test test-quick lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/cogvx demo --out $(DEMO_OUT)

test: setup
	$(BIN)/python -m pytest -q --durations=25

test-quick: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
