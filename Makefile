# One entry point for people and CI.
#   make repro [DATA=archive] [EXTERNAL=external-set]   set up, then train, evaluate and register
#   make test                                            the fast tests (under 2 minutes)
#   make test-all                                        every test, as CI runs them
PYTHON ?= python3
UV_VERSION := 0.13.8
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
BIN := $(abspath $(VENV))/bin
SOURCES := data/sources
DATA ?=
DATA_SHA256 ?=
EXTERNAL ?=
EXTERNAL_SHA256 ?=

# Stages run `python` from PATH, so DVC must see the project's environment first.
export PATH := $(BIN):$(PATH)
export UV_PROJECT_ENVIRONMENT := $(VENV)
export TF_CPP_MIN_LOG_LEVEL := 2
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export GRADIO_ANALYTICS_ENABLED := False

.PHONY: setup setup-dev repro sources test test-all lint app export space benchmark mlflow-ui clean web

setup: $(VENV)/.synced-runtime
setup-dev: $(VENV)/.synced-dev

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet "uv==$(UV_VERSION)"

# --inexact: the runtime set never removes the dev tools a `make test` installed, and vice versa.
# Bytecode is compiled at install: where PYTHONDONTWRITEBYTECODE is set, TensorFlow would otherwise be
# recompiled on every import (16 s instead of 6 s here).
$(VENV)/.synced-runtime: $(UV) pyproject.toml uv.lock
	$(UV) sync --frozen --no-dev --inexact --compile-bytecode
	touch $@

$(VENV)/.synced-dev: $(UV) pyproject.toml uv.lock
	$(UV) sync --frozen --inexact --compile-bytecode
	touch $@ $(VENV)/.synced-runtime

# A local archive (and external set) is linked into data/sources/, which DVC tracks as a dependency:
# params.yaml and `git status` stay as they are. The links stay until replaced (see data/sources/README.md).
sources:
ifneq ($(strip $(DATA)),)
	ln -sfn "$(abspath $(DATA))" $(SOURCES)/train
	rm -f $(SOURCES)/train.sha256
	$(if $(strip $(DATA_SHA256)),echo "$(DATA_SHA256)" > $(SOURCES)/train.sha256)
endif
ifneq ($(strip $(EXTERNAL)),)
	ln -sfn "$(abspath $(EXTERNAL))" $(SOURCES)/external
	rm -f $(SOURCES)/external.sha256
	$(if $(strip $(EXTERNAL_SHA256)),echo "$(EXTERNAL_SHA256)" > $(SOURCES)/external.sha256)
endif

repro: setup sources
	dvc repro

test: setup-dev
	pytest -q -m "not slow and not browser"

test-all: setup-dev web
	pytest -q

lint: setup-dev
	ruff check pipeline serving tests benchmarks docs app.py

app: setup
	python app.py

export: setup
	python -m pipeline.export exports/pneumonia-cnn --force

# A folder to push to a Hugging Face Space: the app, the serving package, the production model exported
# (a Space has no MLflow store), the Space's own locked requirements and its README front matter.
space: setup web
	rm -rf space
	mkdir -p space
	python -m pipeline.export space/model
	cp -r app.py serving examples space/
	rm -f space/serving/pyfunc.py
	rm -rf space/serving/web/node_modules
	find space/serving -name __pycache__ -prune -exec rm -rf {} +
	cp deploy/space/README.md space/README.md
	cd deploy/space && ../../$(UV) export --frozen --no-hashes --no-emit-project --no-header --quiet \
		-o ../../space/requirements.txt

# The on-device page's runtime, from npm at the versions locked in serving/web/package-lock.json: only the
# files the page loads are copied to serving/web/vendor/ (git-ignored), which the app serves itself.
WEB := serving/web
WEB_VENDOR := $(WEB)/node_modules/onnxruntime-web/dist/ort.wasm.min.mjs \
	$(WEB)/node_modules/onnxruntime-web/dist/ort-wasm-simd-threaded.mjs \
	$(WEB)/node_modules/onnxruntime-web/dist/ort-wasm-simd-threaded.wasm \
	$(WEB)/node_modules/dicom-parser/dist/dicomParser.min.js

web: $(WEB)/vendor/.built

$(WEB)/vendor/.built: $(WEB)/package.json $(WEB)/package-lock.json
	cd $(WEB) && npm ci --ignore-scripts --no-audit --no-fund
	rm -rf $(WEB)/vendor
	mkdir -p $(WEB)/vendor/licenses
	cp $(WEB_VENDOR) $(WEB)/vendor/
	cp $(WEB)/node_modules/dicom-parser/LICENSE $(WEB)/vendor/licenses/dicom-parser.LICENSE
	touch $@

benchmark: setup-dev
	python benchmarks/app_benchmark.py --output benchmarks/results.json

mlflow-ui: setup
	mlflow ui --backend-store-uri sqlite:///mlflow.db --workers 1

clean:
	rm -rf $(VENV) $(TOOLS)
