# One entry point for people and CI. `make repro DATA=path/to/archive.zip` trains from a local archive.
PYTHON ?= python3
UV_VERSION := 0.13.8
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
BIN := $(abspath $(VENV))/bin
DATA ?=
DATA_SHA256 ?= null

# Stages run `python` from PATH, so DVC must see the project's environment first.
export PATH := $(BIN):$(PATH)
export TF_CPP_MIN_LOG_LEVEL := 2
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export GRADIO_ANALYTICS_ENABLED := False

.PHONY: setup repro test lint mlflow-ui clean

setup: $(VENV)/.synced

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet "uv==$(UV_VERSION)"

$(VENV)/.synced: $(UV) pyproject.toml uv.lock
	UV_PROJECT_ENVIRONMENT=$(VENV) $(UV) sync --frozen --extra dev
	touch $@

repro: setup
ifeq ($(strip $(DATA)),)
	dvc repro
else
	dvc exp run -S 'data.source=$(DATA)' -S 'data.sha256=$(DATA_SHA256)'
endif

test: setup
	pytest -q

lint: setup
	ruff check pipeline tests

mlflow-ui: setup
	mlflow ui --backend-store-uri sqlite:///mlflow.db --workers 1

clean:
	rm -rf $(VENV) $(TOOLS)
