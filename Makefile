# investment-risk — every target sets up what it needs from nothing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU build of torch (it lies on this kind of machine; a CUDA image would take a CUDA build instead).
TORCH_CPU ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install demo test bench bench-learning clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet "$(TORCH_CPU)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/investment-risk demo --out demo-output

test: install
	$(BIN)/python -m pytest -m "not slow" -n 2 $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/cpu_train.py
	$(BIN)/python bench/cpu_score.py

bench-learning: install
	bash bench/learning.sh

clean:
	rm -rf $(VENV) build dist *.egg-info src/*.egg-info .pytest_cache
