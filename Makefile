# The two commands of the README: `make demo` (review app on a demo workspace) and `make test`.
# Both create the virtual environment and install what they need on a fresh machine.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKSPACE ?= workspace/demo
PORT ?= 8501

.PHONY: install demo demo-workspace serve test test-fast lint format bench-deps clean-demo

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(BIN)/.installed

# Build (or reuse) the demo workspace from assets/demo, then open the review app.
demo: demo-workspace
	$(BIN)/pyrolabel --workspace $(WORKSPACE) serve --port $(PORT)

demo-workspace: install
	$(BIN)/python -m app.demo --workspace $(WORKSPACE)

test: install
	$(BIN)/pytest

test-fast: install
	$(BIN)/pytest -m "not e2e and not shared_data"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# pytorch-grad-cam is a baseline of bench/pseudo_labels.py only; see pyproject.toml.
bench-deps: install
	$(BIN)/pip install --quiet -e ".[bench]"
	$(BIN)/pip install --quiet --no-deps grad-cam

clean-demo:
	rm -rf $(WORKSPACE)
