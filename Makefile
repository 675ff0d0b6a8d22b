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

.PHONY: setup repro test lint app export space benchmark mlflow-ui clean

setup: $(VENV)/.synced

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet "uv==$(UV_VERSION)"

# Bytecode is compiled at install: where PYTHONDONTWRITEBYTECODE is set, TensorFlow would otherwise be
# recompiled on every import (16 s instead of 6 s here).
$(VENV)/.synced: $(UV) pyproject.toml uv.lock
	UV_PROJECT_ENVIRONMENT=$(VENV) $(UV) sync --frozen --extra dev --compile-bytecode
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
	ruff check pipeline tests benchmarks docs app.py

app: setup
	python app.py

export: setup
	python -m pipeline.export exports/pneumonia-cnn

# A folder to push to a Hugging Face Space: the app, the package, the production model exported
# (a Space has no MLflow store), requirements pinned from uv.lock, and the Space's README front matter.
space: setup
	rm -rf space
	mkdir -p space
	python -m pipeline.export space/model
	cp -r app.py pipeline examples space/
	find space/pipeline -name __pycache__ -prune -exec rm -rf {} +
	cp deploy/space/README.md space/README.md
	$(UV) export --frozen --no-dev --no-hashes --no-emit-project --no-header --quiet -o space/requirements.txt

benchmark: setup
	python benchmarks/app_benchmark.py --output benchmarks/results.json

mlflow-ui: setup
	mlflow ui --backend-store-uri sqlite:///mlflow.db --workers 1

clean:
	rm -rf $(VENV) $(TOOLS)
