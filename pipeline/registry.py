"""The one place that talks to MLflow: tracking URI, experiment, model registry, production alias.

The store is SQLite in the real project folder (`mlflow.db`, artifacts in `mlruns/`), resolved to an
absolute path so DVC's temporary experiment workspaces log into the project, not into a copy.
`MLFLOW_TRACKING_URI` overrides it (tests use a temporary store; a team may use a server).
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipeline.common import DEFAULT_MODEL_NAME, load_params, persistent_root

log = logging.getLogger(__name__)

EXPERIMENT_NAME = "pneumonia-screening"
PRODUCTION_ALIAS = "production"
THRESHOLD_TAG = "decision_threshold"
TEMPERATURE_TAG = "temperature"
CALIBRATION_BIAS_TAG = "calibration_bias"
CARD_TAG = "model_card"
ONNX_TAG = "onnx_artifact"
SERVER_TIMEOUT_S = 5.0


class ModelUnavailableError(RuntimeError):
    """No usable model behind a URI, with what to do about it."""


class TrackingUnavailableError(RuntimeError):
    """The MLflow tracking server cannot be reached."""


def tracking_uri() -> str:
    configured = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if configured:
        return configured
    return f"sqlite:///{(persistent_root() / 'mlflow.db').as_posix()}"


def configure_tracking() -> str:
    """Point MLflow at the project's store; fail fast (seconds, not minutes) if a server is down."""
    import mlflow

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = tracking_uri()
    _check_server_reachable(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def _check_server_reachable(uri: str) -> None:
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


def artifact_location(uri: str) -> str | None:
    """Artifacts of a SQLite store live beside the database file, not wherever the cwd happens to be."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlruns").resolve().as_uri()
    return None


def ensure_experiment(name: str = EXPERIMENT_NAME) -> str:
    import mlflow

    uri = configure_tracking()
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return mlflow.create_experiment(name, artifact_location=artifact_location(uri))


def model_name() -> str:
    try:
        return load_params().get("register", {}).get("model_name", DEFAULT_MODEL_NAME)
    except FileNotFoundError:
        return DEFAULT_MODEL_NAME


def production_uri(name: str | None = None) -> str:
    return f"models:/{name or model_name()}@{PRODUCTION_ALIAS}"


@dataclass
class ServingModel:
    """A loaded Keras model with what serving needs beside it."""

    keras_model: Any
    threshold: float
    card: dict[str, Any] = field(default_factory=dict)
    uri: str = ""
    onnx_model: bytes | None = None  # the same network as ONNX, stored beside it (serving.Scorer)
    # Calibration fitted on validation: p = sigmoid(logit / temperature + calibration_bias).
    temperature: float = 1.0
    calibration_bias: float = 0.0

    @property
    def input_size(self) -> int:
        return int(self.keras_model.input_shape[1])


BUNDLE_FILE = "bundle.json"
BUNDLE_MODEL = "model.keras"
BUNDLE_ONNX = "model.onnx"


def load_serving_model(uri: str | None = None) -> ServingModel:
    """Load a model for serving from a registry URI (`models:/name@alias`, `models:/name/3`) or a folder
    written by `python -m pipeline.export`. Raises ModelUnavailableError with a remedy."""
    uri = uri or production_uri()
    local = Path(uri)
    if not uri.startswith("models:/") and local.exists():
        return _load_bundle(local)
    if not uri.startswith("models:/"):
        raise ModelUnavailableError(f"{uri}: neither a models:/ URI nor an existing exported model folder")
    return _load_registered(uri)


def _load_bundle(folder: Path) -> ServingModel:
    import keras

    meta_path, model_path = folder / BUNDLE_FILE, folder / BUNDLE_MODEL
    if not meta_path.is_file() or not model_path.is_file():
        raise ModelUnavailableError(f"{folder} is not an exported model ({BUNDLE_FILE} and {BUNDLE_MODEL} needed)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        model = keras.models.load_model(model_path, compile=False, safe_mode=True)
        threshold = float(meta["threshold"])
    except (OSError, ValueError, KeyError) as error:
        raise ModelUnavailableError(f"exported model in {folder} is unreadable: {error}") from error
    onnx_path = folder / BUNDLE_ONNX
    onnx_model = onnx_path.read_bytes() if onnx_path.is_file() else None
    return ServingModel(model, threshold, meta.get("card", {}), str(folder), onnx_model,
                        float(meta.get("temperature", 1.0)), float(meta.get("calibration_bias", 0.0)))


def _load_registered(uri: str) -> ServingModel:
    import mlflow
    from mlflow.exceptions import MlflowException

    configure_tracking()
    client = mlflow.MlflowClient()
    try:
        version = resolve_version(client, uri)
    except MlflowException as error:
        raise ModelUnavailableError(
            f"no model at {uri} in the MLflow store {tracking_uri()}: train and register one with "
            "`make repro` (or `dvc repro`)"
        ) from error
    try:
        keras_model = mlflow.tensorflow.load_model(f"models:/{version.name}/{version.version}")
    except Exception as error:  # MLflow surfaces missing/corrupt artefacts as many exception types
        raise ModelUnavailableError(
            f"{uri} (version {version.version}) is registered but its files cannot be loaded (missing or "
            f"corrupt artefacts in the MLflow store): register a working model with `dvc repro`, or point "
            f"the alias at another version. Cause: {_brief(error)}"
        ) from error
    threshold = float(version.tags.get(THRESHOLD_TAG, "nan"))
    if math.isnan(threshold):
        raise ModelUnavailableError(f"{uri} (version {version.version}) has no '{THRESHOLD_TAG}' tag")
    card = json.loads(version.tags.get(CARD_TAG, "{}"))
    card.update({"registered_name": version.name, "version": version.version})
    temperature = float(version.tags.get(TEMPERATURE_TAG, "1.0"))
    bias = float(version.tags.get(CALIBRATION_BIAS_TAG, "0.0"))
    return ServingModel(keras_model, threshold, card, uri, _registered_onnx(version), temperature, bias)


def _brief(error: BaseException, limit: int = 300) -> str:
    """The start of a library's error message: enough to see the cause, short enough to read."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _registered_onnx(version: Any) -> bytes | None:
    """The ONNX twin logged at registration, if any; serving converts afresh without it."""
    import mlflow

    artifact = version.tags.get(ONNX_TAG)
    if not artifact:
        return None
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact)).read_bytes()
    except Exception as error:  # noqa: BLE001 (a missing twin only costs a conversion)
        log.warning("ONNX artefact %s unavailable (%s): it will be converted again", artifact, error)
        return None


def resolve_version(client: Any, uri: str) -> Any:
    """The ModelVersion behind `models:/name@alias` or `models:/name/version`."""
    reference = uri.removeprefix("models:/")
    if "@" in reference:
        name, alias = reference.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    name, _, version = reference.rpartition("/")
    if not name or not version.isdigit():
        raise ModelUnavailableError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    return client.get_model_version(name, version)
