"""Where the project and its MLflow store are, and what the production model is called.

Kept apart from `scoring.store` (which loads models) so that the training stages can find the store
without importing the serving runtime.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

MODEL_NAME = "pneumonia-cnn"
PRODUCTION_ALIAS = "production"
PARAMS_FILE = "params.yaml"
SERVER_TIMEOUT_S = 5.0
# MLflow's HTTP client retries a failed request 7 times with exponential backoff (minutes) and waits 120 s
# for an answer: against a tracking server that went away, a stage would hang instead of failing. These
# bound one failed call to about 3 s when the server is gone (connection refused: two retries, after 0 and
# 2 s plus jitter) and about 1.5 minutes when it accepts connections but never answers. Set in the environment only where the user has not.
HTTP_CLIENT_BOUNDS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
# What MLflow's REST client says (in its MlflowException, or the requests/urllib3 error under it) when a
# server did not answer, as opposed to answering with an error of its own (4xx).
_UNREACHABLE_MARKERS = {
    "connection refused": "connection refused",
    "max retries exceeded": "no answer after retries",
    "timed out": "timed out",
    "connection aborted": "connection dropped",
    "remotedisconnected": "connection dropped",
    "connection reset": "connection dropped",
    "name or service not known": "host not found",
    "too many 5": "server errors after retries",
}
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
    """Point MLflow at the store; fail fast (seconds, not minutes) if a tracking server is down, now or later."""
    import mlflow

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = tracking_uri()
    bound_http_client(uri)
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


def bound_http_client(uri: str) -> None:
    """For an http(s) tracking server: MLflow's retries and timeouts bounded (HTTP_CLIENT_BOUNDS), unless set.

    urllib3 logs a warning per retry; the failure that remains after them is reported once, by the caller
    (`unreachable_server`), so the retries themselves stay quiet.
    """
    if urlparse(uri).scheme in ("http", "https"):
        for name, value in HTTP_CLIENT_BOUNDS.items():
            os.environ.setdefault(name, value)
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


def unreachable_server(error: BaseException) -> TrackingUnavailableError | None:
    """The TrackingUnavailableError that `error` (from any MLflow call) amounts to when the tracking server
    stopped answering mid-way, else None. MLflow reports it as an MlflowException "API request to ...
    failed with exception ..." raised while handling the requests/urllib3 connection error."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, TrackingUnavailableError):
            return current
        text = str(current).lower()
        module = type(current).__module__
        from_http_client = module.startswith(("requests", "urllib3")) or text.startswith("api request to ")
        if from_http_client:
            reason = next((why for marker, why in _UNREACHABLE_MARKERS.items() if marker in text), None)
            if reason is not None:
                return TrackingUnavailableError(
                    f"MLflow tracking server {tracking_uri()} stopped answering ({reason}); what this step "
                    "was logging is incomplete: start the server again (or unset MLFLOW_TRACKING_URI) and "
                    "rerun it")
        current = current.__cause__ or current.__context__
    return None


def brief(error: BaseException, limit: int | None = 300) -> str:
    """An error's message on one line (library messages often span several), cut at `limit` if one is given:
    enough to see a library's cause, short enough to read. Every one-line failure (stages, CLIs, model
    loading) is written with it."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."
