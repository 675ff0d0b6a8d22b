"""Stage 5: register the trained model as a new version; move the `production` alias to it only when
it is at least as good as the current production version on the same data, re-scored today.

The deciding metric is `register.promotion_metric` on `register.promotion_split` (default: ROC-AUC,
threshold-free so models with different thresholds compare fairly, on the validation split: choosing
between models is selection, and nothing is selected on the test split). The decision is kept as
version tags, in the version's description and in `reports/registry.json`.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import keras
import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline.common import (
    REPORTS_DIR,
    git_commit,
    read_json,
    setup_logging,
    stage_errors,
    stage_params,
    write_json,
)
from pipeline.evaluate import METRICS_FILE
from pipeline.metrics import point_metrics
from pipeline.preprocess import load_split
from pipeline.registry import (
    BUNDLE_ONNX,
    CALIBRATION_BIAS_TAG,
    CARD_TAG,
    ONNX_TAG,
    PRODUCTION_ALIAS,
    TEMPERATURE_TAG,
    THRESHOLD_TAG,
    ModelUnavailableError,
    TrackingUnavailableError,
    configure_tracking,
    load_serving_model,
)
from pipeline.serving import Scorer, convert_to_onnx
from pipeline.train import MODEL_FILE, RUN_FILE

log = logging.getLogger(__name__)

DECISION_FILE = REPORTS_DIR / "registry.json"


def model_card(run: dict[str, Any], report: dict[str, Any], run_info: Any) -> dict[str, Any]:
    """What the app's model panel shows: provenance, threshold and test metrics with CIs."""
    return {
        "run_id": run["run_id"],
        "trained_at": run_info.info.start_time,
        "git_commit": run_info.data.tags.get("git_commit", "unknown"),
        "data_digest": run["data_digest"],
        "threshold": report["threshold"],
        "threshold_rule": report["threshold_rule"],
        "temperature": report.get("temperature", 1.0),
        "calibration_bias": report.get("calibration_bias", 0.0),
        "test_images": report["test_images"],
        "test_metrics": report["test"],
    }


def current_production_score(client: MlflowClient, name: str, metric: str,
                             split: str) -> tuple[str | None, float | None]:
    """(version, metric on today's `split`) of the current production model, or (None, None)."""
    try:
        version = client.get_model_version_by_alias(name, PRODUCTION_ALIAS)
    except MlflowException:
        return None, None
    try:
        serving = load_serving_model(f"models:/{name}/{version.version}")
    except ModelUnavailableError as error:
        log.warning("production version %s cannot be loaded (%s): it will be replaced", version.version, error)
        return version.version, None
    images, labels = load_split(split)
    scores = Scorer.for_model(serving).probabilities(images)
    return version.version, point_metrics(labels, scores, serving.threshold)[metric]


def log_onnx_twin(run_id: str) -> str | None:
    """Convert the trained model to ONNX once, here, so that serving need not at every start."""
    onnx_model = convert_to_onnx(keras.models.load_model(MODEL_FILE, compile=False, safe_mode=True))
    if onnx_model is None:
        return None
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / BUNDLE_ONNX
        path.write_bytes(onnx_model)
        MlflowClient().log_artifact(run_id, str(path), artifact_path="onnx")
    return f"runs:/{run_id}/onnx/{BUNDLE_ONNX}"


def register(params: dict[str, Any]) -> dict[str, Any]:
    configure_tracking()
    client = MlflowClient()
    name, metric, split = params["model_name"], params["promotion_metric"], params["promotion_split"]
    if split not in ("val", "test"):
        raise ValueError(f"register.promotion_split must be val or test, got '{split}'")
    run, report = read_json(RUN_FILE), read_json(METRICS_FILE)
    card = model_card(run, report, client.get_run(run["run_id"]))
    previous_version, previous_score = current_production_score(client, name, metric, split)
    new_score = report[split][metric]["value"]

    tags = {
        THRESHOLD_TAG: str(report["threshold"]),
        TEMPERATURE_TAG: str(report.get("temperature", 1.0)),
        CALIBRATION_BIAS_TAG: str(report.get("calibration_bias", 0.0)),
        CARD_TAG: json.dumps(card, sort_keys=True),
        "git_commit": card["git_commit"],
        "data_digest": run["data_digest"],
        **{f"test_{key}": str(values["value"]) for key, values in report["test"].items()},
    }
    onnx_artifact = log_onnx_twin(run["run_id"])
    if onnx_artifact:
        tags[ONNX_TAG] = onnx_artifact
    version = mlflow.register_model(run["model_uri"], name, tags=tags)
    promote = previous_score is None or new_score >= round(previous_score, 4)
    reason = _reason(promote, f"{split} {metric}", new_score, previous_version, previous_score)
    client.update_model_version(name, version.version, description=_description(card, reason))
    client.set_model_version_tag(name, version.version, "promotion_decision", reason)
    if promote:
        client.set_registered_model_alias(name, PRODUCTION_ALIAS, version.version)
    decision = {
        "model_name": name, "version": version.version, "promoted": promote, "reason": reason,
        "metric": metric, "split": split, "score": new_score, "previous_production_version": previous_version,
        "previous_production_score": previous_score, "registered_by_commit": git_commit(),
    }
    write_json(DECISION_FILE, decision)
    return decision


def _reason(promote: bool, metric: str, new: float, old_version: str | None, old: float | None) -> str:
    if old_version is None:
        return f"promoted: first production version ({metric} {new:.4f})"
    if old is None:
        return f"promoted: production version {old_version} could not be loaded"
    verdict = "promoted" if promote else f"kept version {old_version}"
    return f"{verdict}: {metric} {new:.4f} vs production v{old_version} {old:.4f} on the same images"


def _description(card: dict[str, Any], reason: str) -> str:
    test = card["test_metrics"]
    summary = ", ".join(
        f"{name} {_number(values['value'])} [{_number(values['ci_low'])}, {_number(values['ci_high'])}]"
        for name, values in test.items()
    )
    return (f"CNN trained from scratch on Kermany et al. 2018 (CC BY 4.0). Commit {card['git_commit']}, "
            f"data {card['data_digest']}. Threshold {card['threshold']:.4f} ({card['threshold_rule']} on "
            f"validation). Test ({card['test_images']} images, 95% CI): {summary}. {reason}.")


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main() -> None:
    setup_logging()
    with stage_errors(log, TrackingUnavailableError, ModelUnavailableError):
        decision = register(stage_params("register"))
    log.info("registered %s version %s: %s", decision["model_name"], decision["version"], decision["reason"])


if __name__ == "__main__":
    main()
