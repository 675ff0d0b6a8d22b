"""Where models live and how a model URI becomes a loaded serving artefact.

A URI is one of
- `models:/NAME@ALIAS` or `models:/NAME/VERSION`: a version in the MLflow registry (the only case that
  imports MLflow), the store being `MLFLOW_TRACKING_URI` or the project's own SQLite `mlflow.db`;
- a folder written by `python -m pipeline.export` (as shipped to a Space), or an MLflow model folder;
- an `.onnx` serving artefact file.
"""

from __future__ import annotations

from pathlib import Path

from serving.locations import (
    MODEL_NAME,
    PRODUCTION_ALIAS,
    TrackingUnavailableError,
    configure_tracking,
    production_uri,
    tracking_uri,
    unreachable_server,
)

__all__ = ["ARTEFACT_FILE", "MODEL_NAME", "PRODUCTION_ALIAS", "ModelUnavailableError", "TrackingUnavailableError",
           "artefact_path", "load_artefact", "production_uri", "resolve_version"]

ARTEFACT_FILE = "model.onnx"
# In the registered MLflow model, the artefact sits under the pyfunc's artifacts.
PYFUNC_ARTEFACT = Path("artifacts") / ARTEFACT_FILE


class ModelUnavailableError(RuntimeError):
    """No usable model behind a URI, with what to do about it."""


def load_artefact(uri: str | None = None):
    """The serving artefact behind `uri` (default: the production alias). Raises ModelUnavailableError
    (or TrackingUnavailableError) with a remedy."""
    from serving.runtime import ArtefactLoadError, ServingArtefact

    uri = uri or production_uri()
    path = artefact_path(uri)
    try:
        return ServingArtefact.from_file(path)
    except (OSError, ArtefactLoadError) as error:
        raise ModelUnavailableError(
            f"{uri}: the model's serving artefact is missing or corrupt ({error}); register a working model "
            "with `make repro`, or point the alias at another version"
        ) from error


def artefact_path(uri: str) -> Path:
    """The local `model.onnx` behind `uri`, downloaded from the registry if need be."""
    if uri.startswith("models:/"):
        return _registered_artefact(uri)
    local = Path(uri)
    if local.is_file():
        return local
    for candidate in (local / ARTEFACT_FILE, local / PYFUNC_ARTEFACT):
        if candidate.is_file():
            return candidate
    if local.is_dir():
        raise ModelUnavailableError(f"{uri} holds no {ARTEFACT_FILE}: not an exported model")
    raise ModelUnavailableError(f"{uri}: neither a models:/ URI nor an existing exported model folder")


def _registered_artefact(uri: str) -> Path:
    import mlflow
    from mlflow.exceptions import MlflowException

    configure_tracking()
    try:
        version = resolve_version(mlflow.MlflowClient(), uri)
    except ModelUnavailableError:
        raise
    except MlflowException as error:
        if (unreachable := unreachable_server(error)) is not None:
            raise unreachable from error
        raise ModelUnavailableError(
            f"no model at {uri} in the MLflow store {tracking_uri()}: train and register one with "
            "`make repro` (or `dvc repro`)"
        ) from error
    except Exception as error:  # a store MLflow cannot open (not a database, another schema): SQLAlchemy errors
        raise ModelUnavailableError(
            f"the MLflow store {tracking_uri()} cannot be read ({brief(error)}): point MLFLOW_TRACKING_URI at a "
            "working store, or serve an exported model with --model-uri"
        ) from error
    try:
        folder = Path(mlflow.artifacts.download_artifacts(f"models:/{version.name}/{version.version}"))
    except Exception as error:  # MLflow surfaces missing artefacts as many exception types
        raise ModelUnavailableError(
            f"{uri} (version {version.version}) is registered but its files cannot be loaded (missing "
            f"artefacts in the MLflow store): register a working model with `make repro`, or point the alias "
            f"at another version. Cause: {brief(error)}"
        ) from error
    if not (folder / PYFUNC_ARTEFACT).is_file() and _is_serving_model(folder):
        raise ModelUnavailableError(
            f"{uri} (version {version.version}) is registered but its serving artefact is missing from the "
            "MLflow store: register a working model with `make repro`, or point the alias at another version")
    if not (folder / PYFUNC_ARTEFACT).is_file():
        raise ModelUnavailableError(
            f"{uri} (version {version.version}) has no serving artefact: it was registered by an older "
            "version of this project; register a new one with `make repro`")
    return folder / PYFUNC_ARTEFACT


def _is_serving_model(folder: Path) -> bool:
    """Whether an MLflow model folder is this project's pyfunc (its MLmodel names the artefact)."""
    description = folder / "MLmodel"
    return description.is_file() and "serving_model" in description.read_text(encoding="utf-8")


def resolve_version(client, uri: str):
    """The ModelVersion behind `models:/name@alias` or `models:/name/version`."""
    reference = uri.removeprefix("models:/")
    if "@" in reference:
        name, alias = reference.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    name, _, version = reference.rpartition("/")
    if not name or not version.isdigit():
        raise ModelUnavailableError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    return client.get_model_version(name, version)


def brief(error: BaseException, limit: int = 300) -> str:
    """An error's message on one line, cut at `limit`: enough to see a library's cause, short enough to read
    (the model-loading clients, the predict CLI and Spark's batch, use it for their one-line failures)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
