# affseg: the few commands a user needs. Every target runs inside .venv/ (made by `make setup`).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export OMP_WAIT_POLICY := PASSIVE
SPACE ?= refine
DATA ?= demo

.PHONY: setup test test-slow demo

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

demo: setup
	$(VENV)/bin/affseg make-demo --out data/demo
