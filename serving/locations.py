"""Where the project and its MLflow store are, and what the production model is called.

Kept apart from `serving.store` (which loads models) so that the training stages can find the store
without importing the serving runtime.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

MODEL_NAME = "pneumonia-cnn"
PRODUCTION_ALIAS = "production"
PARAMS_FILE = "params.yaml"
SERVER_TIMEOUT_S = 5.0
# `dvc exp run --temp` and queued experiments run in a copy under this folder of the real project.
_DVC_TEMP_WORKSPACE = (".dvc", "tmp", "exps")


class TrackingUnavailableError(RuntimeError):
    """The MLflow tracking server cannot be reached."""


def project_root(start: Path | None = None) -> Path:
    """The nearest folder at or above `start` (default: cwd) holding params.yaml; cwd if none does."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / PARAMS_FILE).is_file():
            return folder
    return here


def persistent_root(start: Path | None = None) -> Path:
    """The real project folder, even from inside a DVC temporary experiment workspace.

    Anything that must outlive the run (the MLflow store, the download cache) belongs here, or a
    `dvc exp run --temp` would write it into a workspace that is deleted afterwards.
    """
    root = project_root(start)
    parts = root.parts
    marker_len = len(_DVC_TEMP_WORKSPACE)
    for index in range(len(parts) - marker_len):
        if parts[index : index + marker_len] == _DVC_TEMP_WORKSPACE:
            return Path(*parts[:index])
    return root


def tracking_uri() -> str:
    configured = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if configured:
        return configured
    return f"sqlite:///{(persistent_root() / 'mlflow.db').as_posix()}"


def production_uri(name: str = MODEL_NAME) -> str:
    return f"models:/{name}@{PRODUCTION_ALIAS}"


def configure_tracking() -> str:
    """Point MLflow at the store; fail fast (seconds, not minutes) if a tracking server is down."""
    import mlflow

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = tracking_uri()
    check_server_reachable(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def check_server_reachable(uri: str) -> None:
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=SERVER_TIMEOUT_S):
            pass
    except OSError as error:
        raise TrackingUnavailableError(
            f"MLflow tracking server {uri} is unreachable ({error}); start it or unset MLFLOW_TRACKING_URI "
            "to use the project's local store"
        ) from error
