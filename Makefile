# Two commands set up and run everything on a fresh machine (see README):
#   make compare   -- create .venv, install llmqueue, run the default comparison
#   make test      -- create .venv, install llmqueue with test extras, run the test suite
# Reproducing the paper (docs/reproduce.md):
#   make reproduce        -- every result of the paper, report in llmqueue_output/reproduce/report.html
#   make reproduce-quick  -- the same at a smaller scale (under 2 minutes on 2 cores)
# The optional extras (Ray sweeps, the real CPU engine) have their own targets:
#   make test-extras -- install the ray, cpu and serve extras, run the slow and real-engine checks (CI runs it)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup setup-extras compare reproduce reproduce-quick test test-slow test-extras test-all bench clean

$(VENV)/.installed: pyproject.toml setup.py src/llmqueue/core/_fastcore.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

$(VENV)/.extras: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test,ray,cpu,serve]'
	touch $@

setup: $(VENV)/.installed

setup-extras: $(VENV)/.extras

compare: setup
	$(VENV)/bin/llmqueue compare

reproduce: setup
	$(VENV)/bin/llmqueue reproduce

reproduce-quick: setup
	$(VENV)/bin/llmqueue reproduce --quick

test: setup
	$(PY) -m pytest -q -m "not slow and not real"

test-slow: setup
	$(PY) -m pytest -q -m slow

test-extras: setup-extras
	$(PY) -m pytest -q -m "slow or real"

test-all: setup-extras
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/bench_simulate.py

clean:
	rm -rf $(VENV) llmqueue_output .pytest_cache .hypothesis test-artifacts
