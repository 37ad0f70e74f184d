# affseg: the few commands a user needs. Every target runs inside .venv/ (made by `make setup`).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
AFFSEG := $(VENV)/bin/affseg
export OMP_WAIT_POLICY := PASSIVE

SPACE ?= refine          # sweeps/<SPACE>.yaml: refine | loss | lr | full | stages
DATA ?= demo             # sweeps/profiles/<DATA>.yaml: demo | voc (voc needs VOC_ROOT and UNICL)
RESUME ?= 0              # 1 = continue the interrupted sweep of the same SPACE/DATA
FUSE ?= 1                # trials trained together on one teacher pass (refine, loss, lr spaces)
SWEEP ?=                 # sweep name for promote (default: the latest sweep)
MODEL ?= models:/affseg@champion
SPLIT ?= val
CRF ?= 0
EXPORT ?=
ARGS ?=                  # extra key=value overrides for train / sweep, e.g. ARGS="trials=16"
PRESET ?=                # config preset for train / sweep, e.g. PRESET=reference (affseg/configs/presets/)
HOST ?= 127.0.0.1
MLFLOW_PORT ?= 5000
OPTUNA_PORT ?= 8080

.PHONY: setup test test-slow demo train sweep promote evaluate mlflow-ui optuna-dashboard clean-runs

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
	$(AFFSEG) make-demo --out data/demo

train: setup
	$(AFFSEG) train $(if $(strip $(PRESET)),--preset $(strip $(PRESET)),) $(ARGS)

sweep: setup
	$(AFFSEG) sweep --space $(strip $(SPACE)) --profile $(strip $(DATA)) $(if $(filter 1,$(strip $(RESUME))),--resume,) \
		$(if $(strip $(PRESET)),--preset $(strip $(PRESET)),) $(if $(filter-out 1,$(strip $(FUSE))),fuse=$(strip $(FUSE)),) \
		$(ARGS)

promote: setup
	$(AFFSEG) promote $(if $(strip $(SWEEP)),--sweep $(strip $(SWEEP)),)

evaluate: setup
	$(AFFSEG) evaluate --model $(strip $(MODEL)) --split $(strip $(SPLIT)) \
		$(if $(filter 1,$(strip $(CRF))),--crf,) $(if $(strip $(EXPORT)),--export $(strip $(EXPORT)),)

mlflow-ui: setup
	mkdir -p mlflow/artifacts
	@echo "MLflow UI: http://$(HOST):$(MLFLOW_PORT)/#/experiments?workflowType=machine_learning (the training view)"
	$(VENV)/bin/mlflow ui --host $(HOST) --port $(MLFLOW_PORT) \
		--backend-store-uri sqlite:///mlflow/mlflow.db --default-artifact-root mlflow/artifacts

optuna-dashboard: setup
	$(VENV)/bin/optuna-dashboard --host $(HOST) --port $(OPTUNA_PORT) sqlite:///mlflow/optuna.db
