"""The training side's MLflow: the experiment runs log to, and the registry versions go to.

The store is `MLFLOW_TRACKING_URI`, or SQLite in the real project folder (`mlflow.db`, artifacts in
`mlruns/`), resolved to an absolute path so DVC's temporary experiment workspaces log into the project,
not into a copy (`scoring.locations`, which serving shares, owns that rule).
"""

from __future__ import annotations

from pathlib import Path

from scoring.locations import (
    MODEL_NAME,
    PRODUCTION_ALIAS,
    TrackingUnavailableError,
    configure_tracking,
    production_uri,
    tracking_uri,
)

__all__ = ["EXPERIMENT_NAME", "MODEL_NAME", "PRODUCTION_ALIAS", "TrackingUnavailableError", "artifact_location",
           "configure_tracking", "ensure_experiment", "production_uri", "tracking_uri"]

EXPERIMENT_NAME = "pneumonia-screening"


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
