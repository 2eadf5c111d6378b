# Two commands set up and run everything on a fresh machine (see README):
#   make compare   -- create .venv, install llmqueue, run the default comparison
#   make test      -- create .venv, install llmqueue with test extras, run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup compare test test-slow test-all bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed

compare: setup
	$(VENV)/bin/llmqueue compare

test: setup
	$(PY) -m pytest -q -m "not slow"

test-slow: setup
	$(PY) -m pytest -q -m slow

test-all: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/bench_simulate.py

clean:
	rm -rf $(VENV) llmqueue_output .pytest_cache .hypothesis
