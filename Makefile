# Set-up and the two everyday commands. Every target installs what it needs into .venv first.
#   make demo   - the whole pipeline on the embedded default (tiny model, synthetic videos)
#   make test   - the full test suite (make test-quick skips the slow multi-process end-to-end tests)
#   make lint   - ruff over the tree (configured in pyproject.toml)
# TORCH_SPEC picks the torch build: the default, torch==2.13.0, is a CPU wheel where pip finds one locally; on a GPU
# machine use e.g. `make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
DEMO_OUT ?= demo_out

.PHONY: setup ops demo test test-quick lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/python tests/mlflow_env.py $(VENV)/mlflow
	touch $@

demo: setup
	$(BIN)/cogvx demo --out $(DEMO_OUT)

# Tests run on every core (pytest-xdist; a worker takes the next test when it is free). The offload tests need
# DeepSpeed's CPU Adam: `ops` builds it once per environment, as DS_BUILD_CPU_ADAM=1 would at install time.
PYTEST := $(BIN)/python -m pytest -q -n auto --dist worksteal

ops: setup
	$(BIN)/python -c "from cogvx_dist.train.engine import build_ops; print('DeepSpeed ops ready:', *build_ops())"

test: setup ops
	$(PYTEST) --durations=25

test-quick: setup
	$(PYTEST) -m "not slow"

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
