"""Where models live and how a model URI becomes a loaded serving artefact.

A URI is one of
- `models:/NAME@ALIAS` or `models:/NAME/VERSION`: a version in the MLflow registry (the only case that
  imports MLflow), the store being `MLFLOW_TRACKING_URI` or the project's own SQLite `mlflow.db`;
- a folder written by `python -m pipeline.export` (as shipped to a Space), or an MLflow model folder;
- an `.onnx` serving artefact file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from scoring.locations import (
    MODEL_NAME,
    PRODUCTION_ALIAS,
    TrackingUnavailableError,
    brief,
    configure_tracking,
    production_uri,
    tracking_uri,
    unreachable_server,
)

__all__ = [
    "ARTEFACT_NAME",
    "MODEL_NAME",
    "MODEL_URI_FORMS",
    "PRODUCTION_ALIAS",
    "ModelUnavailableError",
    "RegisteredModel",
    "TrackingUnavailableError",
    "artefact_path",
    "download_registered",
    "load_artefact",
    "model_uri_help",
    "production_uri",
    "resolve_version",
]

# The serving artefact's file name inside an exported or registered model (the pipeline's own copy is
# pipeline.paths.ARTEFACT_FILE, models/serving.onnx).
ARTEFACT_NAME = "model.onnx"
# In the registered MLflow model, the artefact sits under the pyfunc's artifacts.
PYFUNC_ARTEFACT = Path("artifacts") / ARTEFACT_NAME


# How every command line (the app, the predict CLI, export, Spark) names what its --model-uri takes.
MODEL_URI_FORMS = "models:/NAME@ALIAS, models:/NAME/VERSION, an exported model folder or its model.onnx"
DEFAULT_MODEL_WORDS = "the production alias in the project's MLflow store"


def model_uri_help(default: str = DEFAULT_MODEL_WORDS, forms: str = MODEL_URI_FORMS) -> str:
    """The `--model-uri` help: what it takes (`forms`) and what it is without one (`default`)."""
    return f"{forms} (default: {default})"


class ModelUnavailableError(RuntimeError):
    """No usable model behind a URI, with what to do about it."""


def load_artefact(uri: str | None = None):
    """The serving artefact behind `uri` (default: the production alias). Raises ModelUnavailableError
    (or TrackingUnavailableError) with a remedy."""
    uri = uri or production_uri()
    return _open(uri, artefact_path(uri))


def _open(uri: str, path: Path):
    from scoring.runtime import ArtefactLoadError, ServingArtefact

    try:
        return ServingArtefact.from_file(path)
    except (OSError, ArtefactLoadError) as error:
        raise ModelUnavailableError(
            f"{uri}: the model's serving artefact is missing or corrupt ({error}); register a working model "
            "with `make repro`, or point the alias at another version"
        ) from error


class PendingArtefact:
    """A `models:/` URI resolved and downloaded by a helper process (`python -m scoring.store URI DEST`)
    while the caller does other work: the app starts it before importing Gradio, so the two run on two
    cores, and MLflow is never imported into the app's own process."""

    def __init__(self, uri: str, process: subprocess.Popen, scratch: Path) -> None:
        self.uri, self._process, self._scratch = uri, process, scratch

    @classmethod
    def start(cls, uri: str | None) -> PendingArtefact | None:
        """The helper for `uri` (default: the production alias); None for a local path (quick to open)."""
        uri = uri or production_uri()
        if not uri.startswith("models:/"):
            return None
        scratch = Path(tempfile.mkdtemp(prefix="pneumonia-model-"))
        package_root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        process = subprocess.Popen([sys.executable, "-m", "scoring.store", uri, str(scratch)], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return cls(uri, process, scratch)

    def load(self):
        """The serving artefact, once the helper is done; its failure is raised here, as load_artefact's."""
        try:
            out, err = self._process.communicate()
            answer = _last_json(out)
            if "path" in answer:
                return _open(self.uri, Path(answer["path"]))
            if answer.get("error") == TrackingUnavailableError.__name__:
                raise TrackingUnavailableError(answer["message"])
            lines = err.strip().splitlines()  # a crash of the helper itself: its traceback's last line
            raise ModelUnavailableError(answer.get("message") or (
                f"{self.uri}: the model could not be resolved ({lines[-1][:300] if lines else 'no output'})"))
        finally:
            shutil.rmtree(self._scratch, ignore_errors=True)


def _last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return {}


def artefact_path(uri: str, dst_path: Path | None = None) -> Path:
    """The local `model.onnx` behind `uri`, downloaded from the registry (to `dst_path`) if need be."""
    if uri.startswith("models:/"):
        return _registered_artefact(uri, dst_path)
    local = Path(uri)
    if local.is_file():
        return local
    for candidate in (local / ARTEFACT_NAME, local / PYFUNC_ARTEFACT):
        if candidate.is_file():
            return candidate
    if local.is_dir():
        raise ModelUnavailableError(f"{uri} holds no {ARTEFACT_NAME}: not an exported model")
    raise ModelUnavailableError(f"{uri}: neither a models:/ URI nor an existing exported model folder")


@dataclass(frozen=True)
class RegisteredModel:
    """A registry version downloaded: its pinned `models:/NAME/VERSION` URI and its local MLflow model folder."""

    name: str
    version: str
    folder: Path

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def download_registered(uri: str, dst_path: Path | None = None) -> RegisteredModel:
    """The one resolver of `models:/` URIs (app, CLIs, Spark): the version behind `uri`, pinned, and its
    files, downloaded to `dst_path` (default: MLflow's own temporary folder). Raises ModelUnavailableError
    or TrackingUnavailableError with a remedy."""
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
    pinned = RegisteredModel(version.name, str(version.version), Path())
    try:
        folder = mlflow.artifacts.download_artifacts(pinned.uri, dst_path=None if dst_path is None else str(dst_path))
    except Exception as error:  # MLflow surfaces missing artefacts as many exception types
        raise ModelUnavailableError(
            f"{uri} (version {version.version}) is registered but its files cannot be loaded (missing "
            f"artefacts in the MLflow store): register a working model with `make repro`, or point the alias "
            f"at another version. Cause: {brief(error)}"
        ) from error
    return replace(pinned, folder=Path(folder))


def _registered_artefact(uri: str, dst_path: Path | None = None) -> Path:
    registered = download_registered(uri, dst_path)
    folder, version = registered.folder, registered.version
    if not (folder / PYFUNC_ARTEFACT).is_file() and _is_serving_model(folder):
        raise ModelUnavailableError(
            f"{uri} (version {version}) is registered but its serving artefact is missing from the "
            "MLflow store: register a working model with `make repro`, or point the alias at another version")
    if not (folder / PYFUNC_ARTEFACT).is_file():
        raise ModelUnavailableError(
            f"{uri} (version {version}) has no serving artefact: it was registered by an older "
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


def main(argv: list[str]) -> int:
    """`python -m scoring.store URI DEST`: download the artefact behind URI into DEST and print one JSON line,
    {"path": ...} or {"error": ..., "message": ...} (exit status 2): the helper behind PendingArtefact."""
    uri, dest = argv
    try:
        answer = {"path": str(artefact_path(uri, Path(dest)))}
    except (ModelUnavailableError, TrackingUnavailableError) as error:
        answer = {"error": type(error).__name__, "message": str(error)}
    print(json.dumps(answer), flush=True)
    return 0 if "path" in answer else 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
