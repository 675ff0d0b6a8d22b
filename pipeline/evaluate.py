"""Stage 4: choose the threshold on validation, measure the test split with bootstrap CIs, draw plots.

Outputs: `reports/metrics.json` (DVC metrics), `reports/plots/*.json|csv` (DVC plots), PNG figures in
`reports/figures/` (DVC's HTML needs a CDN; PNGs do not), all also logged to the training run.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import keras
import matplotlib
import mlflow
import numpy as np

from pipeline.common import CLASS_NAMES, REPORTS_DIR, read_json, setup_logging, stage_params, write_json
from pipeline.metrics import (
    apply_temperature,
    calibration_points,
    choose_threshold,
    expected_calibration_error,
    fit_platt,
    fit_temperature,
    metrics_with_ci,
    pr_points,
    roc_points,
)
from pipeline.preprocess import load_split
from pipeline.registry import CALIBRATION_BIAS_TAG, TEMPERATURE_TAG, THRESHOLD_TAG, configure_tracking
from pipeline.serving import Scorer
from pipeline.train import MODEL_FILE, RUN_FILE

matplotlib.use("Agg")  # files only, no display
from matplotlib import pyplot as plt

log = logging.getLogger(__name__)

METRICS_FILE = REPORTS_DIR / "metrics.json"
PLOTS_DIR = REPORTS_DIR / "plots"
FIGURES_DIR = REPORTS_DIR / "figures"


def evaluate(scorer: Scorer, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Calibrate and choose the threshold on validation only; then measure the test split once."""
    val_images, val_labels = load_split("val")
    test_images, test_labels = load_split("test")
    raw_val, raw_test = scorer.probabilities(val_images), scorer.probabilities(test_images)
    temperature, bias = fit_calibration(val_labels, raw_val, params.get("calibration", "none"))
    val_scores = apply_temperature(raw_val, temperature, bias)
    test_scores = apply_temperature(raw_test, temperature, bias)
    threshold = choose_threshold(val_labels, val_scores, params["threshold_rule"],
                                 params.get("target_sensitivity", 0.95))
    resamples, seed = params["bootstrap_resamples"], params["seed"]
    report = {
        "threshold": round(threshold, 6),
        "threshold_rule": params["threshold_rule"],
        "temperature": round(temperature, 4),
        "calibration_bias": round(bias, 4),
        "test_ece_before_calibration": round(expected_calibration_error(test_labels, raw_test), 4),
        "test": metrics_with_ci(test_labels, test_scores, threshold, resamples, seed),
        "val": metrics_with_ci(val_labels, val_scores, threshold, resamples, seed),
        "test_images": len(test_labels),
        "val_images": len(val_labels),
    }
    return report, {"labels": test_labels.astype(int), "scores": test_scores}


def fit_calibration(labels: np.ndarray, raw_scores: np.ndarray, method: str) -> tuple[float, float]:
    """(temperature, bias) for sigmoid(logit / temperature + bias), fitted on validation."""
    if method == "temperature":
        return fit_temperature(labels, raw_scores), 0.0
    if method == "platt":
        return fit_platt(labels, raw_scores)
    if method == "none":
        return 1.0, 0.0
    raise ValueError(f"unknown calibration '{method}': use none, temperature or platt")


def write_plot_data(labels: np.ndarray, scores: np.ndarray, threshold: float, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "roc.json", roc_points(labels, scores))
    write_json(folder / "precision_recall.json", pr_points(labels, scores))
    write_json(folder / "calibration.json", calibration_points(labels, scores))
    with (folder / "confusion.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["actual", "predicted"])
        for label, score in zip(labels, scores):
            writer.writerow([CLASS_NAMES[label], CLASS_NAMES[int(score >= threshold)]])


def draw_figures(labels: np.ndarray, scores: np.ndarray, report: dict[str, Any], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    threshold, test = report["threshold"], report["test"]
    paths = []
    figure, axes = plt.subplots(figsize=(4.5, 4))
    predicted = (scores >= threshold).astype(int)
    matrix = np.array([[np.sum((labels == a) & (predicted == p)) for p in (0, 1)] for a in (0, 1)])
    axes.imshow(matrix, cmap="Blues")
    for (row, col), count in np.ndenumerate(matrix):
        axes.text(col, row, str(count), ha="center", va="center", fontsize=14,
                  color="white" if count > matrix.max() / 2 else "black")
    axes.set(xticks=[0, 1], yticks=[0, 1], xticklabels=CLASS_NAMES, yticklabels=CLASS_NAMES,
             xlabel="predicted", ylabel="actual", title=f"Test confusion matrix (threshold {threshold:.3f})")
    paths.append(_save(figure, folder / "confusion_matrix.png"))

    curves = {
        "roc.png": (roc_points(labels, scores), "fpr", "tpr", "ROC", f"AUC {test['roc_auc']['value']:.3f}"),
        "precision_recall.png": (pr_points(labels, scores), "recall", "precision", "Precision-recall",
                                 f"AP {test['pr_auc']['value']:.3f}"),
    }
    for name, (points, x_key, y_key, title, legend) in curves.items():
        figure, axes = plt.subplots(figsize=(4.5, 4))
        axes.plot([p[x_key] for p in points], [p[y_key] for p in points], label=legend)
        axes.set(xlabel=x_key, ylabel=y_key, title=f"{title} (test)", xlim=(0, 1), ylim=(0, 1.02))
        axes.legend(loc="lower right" if name == "roc.png" else "lower left")
        paths.append(_save(figure, folder / name))

    figure, axes = plt.subplots(figsize=(4.5, 4))
    bins = calibration_points(labels, scores)
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect")
    axes.plot([b["mean_predicted"] for b in bins], [b["fraction_positive"] for b in bins], marker="o",
              label=f"model (ECE {test['ece']['value']:.3f})")
    axes.set(xlabel="mean predicted probability", ylabel="fraction with pneumonia",
             title="Reliability diagram (test)", xlim=(0, 1), ylim=(0, 1))
    axes.legend(loc="upper left")
    paths.append(_save(figure, folder / "calibration.png"))
    return paths


def _save(figure: Any, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def flat_metrics(report: dict[str, Any]) -> dict[str, float]:
    flat = {"decision_threshold": report["threshold"], "temperature": report["temperature"],
            "calibration_bias": report.get("calibration_bias", 0.0),
            "test_ece_before_calibration": report["test_ece_before_calibration"]}
    for split in ("test", "val"):
        for name, values in report[split].items():
            for key, value in values.items():
                suffix = "" if key == "value" else f"_{key}"
                flat[f"{split}_{name}{suffix}"] = value
    return flat


def log_to_training_run(report: dict[str, Any], figures: list[Path]) -> None:
    configure_tracking()
    run_id = read_json(RUN_FILE)["run_id"]
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({k: v for k, v in flat_metrics(report).items() if v is not None})
        mlflow.set_tag(THRESHOLD_TAG, str(report["threshold"]))
        mlflow.set_tag(TEMPERATURE_TAG, str(report["temperature"]))
        mlflow.set_tag(CALIBRATION_BIAS_TAG, str(report.get("calibration_bias", 0.0)))
        mlflow.set_tag("threshold_rule", report["threshold_rule"])
        for figure in figures:
            mlflow.log_artifact(str(figure), artifact_path="evaluation")
        mlflow.log_artifact(str(METRICS_FILE), artifact_path="evaluation")


def main() -> None:
    from pipeline.common import stage_errors
    from pipeline.registry import TrackingUnavailableError

    setup_logging()
    with stage_errors(log, TrackingUnavailableError):
        configure_tracking()  # first: an unreachable store fails in seconds, not after scoring and plotting
        params = stage_params("evaluate")
        scorer = Scorer(keras.models.load_model(MODEL_FILE, compile=False, safe_mode=True))
        report, test = evaluate(scorer, params)
        write_json(METRICS_FILE, report)
        write_plot_data(test["labels"], test["scores"], report["threshold"], PLOTS_DIR)
        figures = draw_figures(test["labels"], test["scores"], report, FIGURES_DIR)
        log_to_training_run(report, figures)
    log.info("threshold %.4f; test %s", report["threshold"],
             {name: values["value"] for name, values in report["test"].items()})


if __name__ == "__main__":
    main()
