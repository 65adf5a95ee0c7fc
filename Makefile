# Two commands do everything on a fresh clone: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test setup lint format bench screenshots clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/workbench launch

test: $(STAMP)
	$(BIN)/ruff check engine engine_build bench workbench panels store tests scripts
	$(BIN)/python scripts/check_imports.py
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check engine engine_build bench workbench panels store tests scripts
	$(BIN)/ruff format --check engine engine_build bench workbench panels store tests scripts
	$(BIN)/python scripts/check_imports.py  # layers and no import cycles (see its docstring)

format: $(STAMP)
	$(BIN)/ruff format engine engine_build bench workbench panels store tests scripts
	$(BIN)/ruff check --fix engine engine_build bench workbench panels store tests scripts

bench: $(STAMP)
	$(BIN)/workbench bench --model tiny --num-requests 32 --compare hf

screenshots: $(STAMP)
	$(BIN)/python scripts/screenshots.py --model tiny --out screenshots

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
