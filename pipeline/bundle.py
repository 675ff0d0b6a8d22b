"""Stage: export the version the register stage just registered to `models/registered/` (the serving
artefact and its model card), tracked by DVC so that `dvc pull` brings a servable model anywhere.

A stage of its own, after `register`: the model card's wording is a client of the scoring core, and a
change to it rewrites this folder without registering a new model version."""

from __future__ import annotations

import logging

from pipeline.common import read_json, setup_logging, stage_errors
from pipeline.export import export
from pipeline.paths import REGISTERED_DIR, REGISTRY_FILE
from scoring.store import ModelUnavailableError, TrackingUnavailableError

log = logging.getLogger(__name__)


def registered_uri() -> str:
    """The `models:/NAME/VERSION` the register stage wrote down (pinned: never whatever the alias is now)."""
    record = read_json(REGISTRY_FILE)
    return f"models:/{record['model_name']}/{record['version']}"


def main() -> None:
    setup_logging()
    with stage_errors(log, TrackingUnavailableError, ModelUnavailableError):
        uri = registered_uri()
        export(uri, REGISTERED_DIR, force=True)
    log.info("exported %s to %s", uri, REGISTERED_DIR)


if __name__ == "__main__":
    main()
