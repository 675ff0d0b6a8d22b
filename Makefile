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
$(VENV)/.synced-runtime: $(UV) pyproject.toml uv.lock $(TF_CHOICE)
	$(TF_SWITCH)
	$(UV) sync --frozen --no-dev --inexact --compile-bytecode --extra $(TF)
	touch $@

$(VENV)/.synced-dev: $(UV) pyproject.toml uv.lock $(TF_CHOICE)
	$(TF_SWITCH)
	$(UV) sync --frozen --inexact --compile-bytecode --extra $(TF)
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

# The slowest tests are listed at the end, so that a suite creeping towards CI's limit shows where. Two
# workers (pytest-xdist), each taking whole test files so that a file's shared fixtures are built once:
# most of the suite waits on subprocesses (dvc repro, apps, browsers), so two overlap well on two cores.
test-all: setup-dev setup-scale web
	pytest -q --durations=20 -n 2 --dist loadfile

lint: setup-dev
	ruff check pipeline scoring serving tests benchmarks docs app.py

# The on-device page's runtime is built first where npm is installed; the server page needs none of it.
WEB_MISSING := the 'On this device' page needs its runtime (make web)
app: setup
	@if command -v npm >/dev/null 2>&1; then $(MAKE) --no-print-directory web \
		|| echo "make web failed (offline?): $(WEB_MISSING); the server page works"; \
	else echo "npm not found: $(WEB_MISSING): install Node.js 20+ with npm, then make app again"; fi
	python app.py

export: setup
	python -m pipeline.export exports/pneumonia-cnn --force

# A folder to push to a Hugging Face Space: the app, the scoring core (without the MLflow pyfunc) and its clients, the production model exported
# (a Space has no MLflow store), the Space's own locked requirements and its README front matter.
space: setup web
	rm -rf space
	mkdir -p space
	python -m pipeline.export space/model
	cp -r app.py scoring serving examples space/
	rm -f space/scoring/pyfunc.py space/scoring/pyfunc_model.py
	rm -rf space/serving/web/node_modules
	find space/scoring space/serving -name __pycache__ -prune -exec rm -rf {} +
	cp deploy/space/README.md deploy/space/.gitattributes space/
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

# The UI alone: with job execution on, `mlflow ui` also starts a job runner and huey consumers (11 processes,
# ~2.7 GB here) that browsing runs and models never uses.
mlflow-ui: setup
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri sqlite:///mlflow.db \
		--host $(MLFLOW_HOST) --port $(MLFLOW_PORT) --workers 1

clean:
	rm -rf $(VENV) $(TOOLS)

# ---- Scale-out (issue #10): TensorFlow flavour, Spark and PostgreSQL extras, a shared tracking server ----
# TensorFlow comes from one of two conflicting extras (pyproject.toml [tool.uv] conflicts): `make setup`
# installs tensorflow-cpu; `make setup TF=gpu` installs tensorflow[and-cuda] instead (CUDA and cuDNN as
# wheels; needs only an NVIDIA driver). The choice is remembered in .tools/tf-extra until changed again.
TF_CHOICE := $(TOOLS)/tf-extra
TF ?= $(shell cat $(TF_CHOICE) 2>/dev/null || echo cpu)
ifeq ($(filter $(TF),cpu gpu),)
$(error TF must be cpu or gpu, not '$(TF)')
endif
# Both flavours install the same `tensorflow` module: remove the other one before switching (Linux).
TF_OTHER := $(if $(filter gpu,$(TF)),tensorflow-cpu,tensorflow)
TF_SWITCH = @if [ -x $(VENV)/bin/python ] && [ "$$(uname -s)" = Linux ]; then \
	$(UV) pip uninstall --quiet --python $(VENV)/bin/python $(TF_OTHER) 2>/dev/null || true; fi

# Rewritten (so the environment is synced again) only when TF changes.
$(TF_CHOICE): FORCE | $(UV)
	@[ "$$(cat $@ 2>/dev/null)" = "$(TF)" ] || echo "$(TF)" > $@

FORCE:

# pyspark (batch scoring on Spark; needs Java 17+) and the PostgreSQL driver: `make test-all` needs both.
setup-scale: $(VENV)/.synced-scale
$(VENV)/.synced-scale: $(VENV)/.synced-dev
	$(UV) sync --frozen --inexact --compile-bytecode --extra $(TF) --extra spark --extra postgres
	touch $@

# A shared MLflow tracking server on loopback: runs, the registry and (proxied) artifacts, for everyone
# pointing MLFLOW_TRACKING_URI at it (`export MLFLOW_TRACKING_URI=http://127.0.0.1:5000`, then `make
# repro`, `make app`...). The backend defaults to SQLite under mlflow-server/; for PostgreSQL:
#   make setup-scale && make mlflow-server MLFLOW_BACKEND=postgresql://USER@HOST:5432/mlflow
# Artifacts go to MLFLOW_ARTIFACTS (a folder, or s3://bucket/prefix with boto3 installed).
MLFLOW_HOST ?= 127.0.0.1
MLFLOW_PORT ?= 5000
MLFLOW_SERVER_DIR ?= mlflow-server
MLFLOW_BACKEND ?= sqlite:///$(abspath $(MLFLOW_SERVER_DIR))/mlflow.db
MLFLOW_ARTIFACTS ?= $(abspath $(MLFLOW_SERVER_DIR))/artifacts

mlflow-server: setup
	mkdir -p $(MLFLOW_SERVER_DIR)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow server --host $(MLFLOW_HOST) --port $(MLFLOW_PORT) \
		--backend-store-uri "$(MLFLOW_BACKEND)" --artifacts-destination "$(MLFLOW_ARTIFACTS)" --workers 1

# Spark local[2] against the predict CLI on the 5,216-image mirror (ARCHIVE=... for another archive).
ARCHIVE ?= ../shared/datasets/chest-xray-train-224.zip
batch-benchmark: setup-scale
	python benchmarks/batch_benchmark.py --archive "$(ARCHIVE)" --output benchmarks/batch-results.json
