"""What several test modules share: paths, builders of small models and projects, a launched app.

Fixtures built on these live in conftest.py; test modules import plain helpers from here only.
"""

from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

PROJECT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_DATASET = FIXTURES / "chest_xray"
EXAMPLES = sorted((PROJECT / "examples").glob("*.png"))


def docs_script(name: str):
    """A tool of docs/ loaded as a module, registered under its name. They are not a package: they import
    each other by file name, so a test loads the tool's siblings first (their registration resolves the imports)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, PROJECT / "docs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# Keras 3.15's model.save trips NumPy 2's __array__(copy=) deprecation inside Keras itself; nothing to act on.
KERAS_SAVE_WARNING = "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
# Debian's Chromium (Playwright cannot download its own browsers here), quiet on a closed network.
CHROMIUM = Path("/usr/bin/chromium")
# The marks of every test that drives Debian's Chromium (tests/test_browser.py, tests/test_app_browser.py).
BROWSER_TEST_MARKS = [
    pytest.mark.browser,
    pytest.mark.filterwarnings(KERAS_SAVE_WARNING),
    pytest.mark.filterwarnings("ignore::Warning:gradio.queueing"),  # Gradio's own pandas deprecations
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                                     "(apt-get install chromium)"),
]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
TINY_MODEL = {"backbone": "scratch", "image_size": 32, "filters": [4, 8], "dropout": 0.0, "crop": 1.0,
              "stem_filters": 0}


# --------------------------------------------------------------------------------------------------
# Files and archives


def write(folder: Path, name: str, data: bytes) -> str:
    path = Path(folder) / name
    path.write_bytes(data)
    return str(path)


def build_fixture_zip(destination: Path, with_test_split: bool = False) -> Path:
    """A zip in the public archive layout (chest_xray/train/{NORMAL,PNEUMONIA}) from the fixture images;
    `with_test_split` also files a third of each class under chest_xray/test, as the public archive has."""
    with zipfile.ZipFile(destination, "w") as archive:
        for path in sorted(FIXTURE_DATASET.rglob("*.jpeg")):
            name = path.relative_to(FIXTURES).as_posix()
            if with_test_split and sum(map(ord, path.name)) % 3 == 0:
                name = name.replace("/train/", "/test/")
            archive.write(path, name)
    return destination


# --------------------------------------------------------------------------------------------------
# Params and tiny models


def project_params():
    from pipeline.params import load_params

    return load_params(PROJECT)


def train_params(**overrides: Any):
    """The project's train params with `overrides` (e.g. a tiny network for fast tests)."""
    return replace(project_params().train, **overrides)


def tiny_keras_model(input_size: int = 64, orientation: int | None = 0, **overrides: Any):
    """An untrained tiny CNN whose orientation head is sure every image lies in `orientation` (0: upright,
    as a trained model says of an upright X-ray; None: left untrained, unsure of everything)."""
    from pipeline.model import ORIENTATION_OUTPUT_NAME, build_model

    model = build_model(input_size, train_params(**{**TINY_MODEL, **overrides}))
    if orientation is not None:
        head = model.get_layer(ORIENTATION_OUTPUT_NAME)
        kernel, bias = head.get_weights()
        sure = np.where(np.arange(len(bias)) == orientation, 12.0, 0.0).astype(bias.dtype)
        head.set_weights([np.zeros_like(kernel), sure])
    return model


def write_tiny_bundle(folder: Path, threshold: float = 0.5, orientation: int | None = 0, **decision: Any) -> Path:
    """An exported model folder (as `python -m pipeline.export` writes) around an untrained tiny CNN."""
    from pipeline.artefact import build
    from pipeline.export import write_bundle
    from scoring.decision import Decision

    model = tiny_keras_model(orientation=orientation)
    values = {"threshold": threshold, "threshold_rule": "youden", "input_size": 64, "model_name": "tiny-test-model",
              "model_version": "7", "training_commit": "0123abc", "trained_at": "2023-11-14T22:13:20+00:00",
              "calibration": {"method": "platt", "temperature": 1.3, "bias": 0.2, "fitted_on": "val"},
              "metrics": {"external": {"roc_auc": {"value": 0.61, "ci_low": 0.42, "ci_high": 0.8}}},
              "images": {"external": 12}, **decision}
    return write_bundle(build(model, Decision(**values)), Path(folder))


def register_production(folder: Path, bundle: Path, experiment: str = "tests") -> tuple[str, Path]:
    """A SQLite MLflow store in `folder` whose production model (`models:/pneumonia-cnn@production`, version 1)
    is `bundle`'s artefact, stamped with that name and version and logged as the register stage logs it (the
    project's pyfunc). Returns the store's tracking URI and the registered artefact file: the exact bytes
    every way of serving the alias scores with."""
    import mlflow

    from pipeline.register import log_serving_model
    from scoring.decision import write as stamp
    from scoring.locations import MODEL_NAME, PRODUCTION_ALIAS
    from scoring.runtime import ServingArtefact
    from scoring.store import ARTEFACT_NAME

    uri = f"sqlite:///{(folder / 'mlflow.db').as_posix()}"
    artefact = folder / "registered" / ARTEFACT_NAME  # the pyfunc's artifacts keep the file's name
    artefact.parent.mkdir()
    original = (bundle / "model.onnx").read_bytes()
    artefact.write_bytes(stamp(original, ServingArtefact(original).decision.registered(MODEL_NAME, "1")))
    with pytest.MonkeyPatch.context() as patch:
        # Both: an earlier test's store may still be MLflow's registry (set_registry_uri writes the environment).
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("MLFLOW_REGISTRY_URI", uri)
        patch.chdir(PROJECT)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        experiment_id = mlflow.create_experiment(experiment, artifact_location=(folder / "mlruns").as_uri())
        with mlflow.start_run(experiment_id=experiment_id) as active:
            pass
        version = mlflow.register_model(log_serving_model(active.info.run_id, artefact), MODEL_NAME)
        mlflow.MlflowClient().set_registered_model_alias(MODEL_NAME, PRODUCTION_ALIAS, version.version)
    return uri, artefact


# --------------------------------------------------------------------------------------------------
# A launched app


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launched(demo, **launch_options) -> str:
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True,
                **launch_options)
    return demo.local_url


def raw_get(url: str, path: str) -> tuple[int, bytes]:
    """GET `path` exactly as written: no client-side normalisation of `..` or percent-escapes."""
    import http.client

    host, port = url.split("//", 1)[1].rstrip("/").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def client_for(url: str):
    from gradio_client import Client

    return Client(url, verbose=False, analytics_enabled=False)


# --------------------------------------------------------------------------------------------------
# Temporary copies of the project, for tests that run the real stages


COPIED = ["pipeline", "scoring", "serving", "examples", "dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", "pyproject.toml",
          "data/sources/README.md"]


def run(command: list[str], cwd: Path, env: dict[str, str], expected: int = 0,
        timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a command to completion; fail the test, showing its output, unless it exits `expected`."""
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                            check=False)
    if result.returncode != expected:
        raise AssertionError(f"{' '.join(command)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def project_env(**extra: str) -> dict[str, str]:
    """The caller's environment without MLFLOW_* and DVC_*, the venv's bin first on PATH, quiet tools."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MLFLOW_", "DVC_"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", MLFLOW_DISABLE_TELEMETRY="true",
               DVC_NO_ANALYTICS="1", TF_CPP_MIN_LOG_LEVEL="2", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    env.update(extra)
    return env


def update_params(project: Path, **sections: dict[str, Any]) -> None:
    """Merge values into sections of the copy's params.yaml: update_params(root, train={"epochs": 2})."""
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, values in sections.items():
        if isinstance(params.get(section), dict):
            params[section].update(values)
        else:
            params[section] = values
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def tiny_params(project: Path, archive: Path) -> None:
    """Params for a run of about a minute on the fixture archive: small images, one epoch, few resamples, and
    the small scratch network (a pretrained backbone adds a minute a run; tests/test_pretrained.py builds,
    saves, loads and exports one through the same stage code)."""
    update_params(
        project,
        data={"source": str(archive), "sha256": None},
        preprocess={"image_size": 64, "val_fraction": 0.25, "test_fraction": 0.25},
        train={"backbone": "scratch", "image_size": 32, "filters": [8, 16], "epochs": 1, "batch_size": 8,
               "patience": 1},
        # The fixture archive has no test split, so no external set: calibrate on validation.
        evaluate={"bootstrap_resamples": 50, "cross_fit_folds": 2, "calibration_split": "val"},
    )


def create_project(root: Path, archive: Path) -> dict[str, str]:
    """Copy the project into `root` with tiny params on `archive`, as a committed git + DVC repository.

    Returns the environment to run commands in it with. Nothing is reproduced yet.
    """
    root.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        source, target = PROJECT / name, root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "node_modules", "vendor"))
        elif source.exists():
            shutil.copy2(source, target)
    tiny_params(root, archive)
    env = project_env()
    run(["git", "init", "-q"], root, env)
    run(["dvc", "init", "-q"], root, env)
    run(["dvc", "config", "core.analytics", "false"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "fixture project"], root, env)
    return env


def registry_rows(project: Path, query: str) -> list[tuple]:
    """Rows of a query on the copy's MLflow store."""
    with sqlite3.connect(project / "mlflow.db") as connection:
        return connection.execute(query).fetchall()


def peek_rows(project: Path, query: str) -> list[tuple]:
    """Like registry_rows, but read-only and safe while a stage is writing: [] when the store or the
    table does not exist yet, or the database is busy (never creates an empty mlflow.db)."""
    path = project / "mlflow.db"
    if not path.is_file():
        return []
    try:
        connection = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=1)
        try:
            return connection.execute(query).fetchall()
        finally:
            connection.close()
    except sqlite3.OperationalError:  # no such table yet, or locked by a writer
        return []


def column(table: dict, name: str) -> list:
    """One column of the app's table value (Gradio's headers and rows)."""
    index = table["headers"].index(name)
    return [row[index] for row in table["data"]]
