"""Stage: calibrate, choose the threshold, measure every split with bootstrap CIs, write the serving artefact.

Calibration (`evaluate.calibration`) and the threshold (`evaluate.threshold_rule`) are fitted on
`evaluate.calibration_split`: validation, or the external set (the site the model will see). The split
that fitted them is reported out of fold: cross-fitting by patient, so no figure is measured on the
images that chose it. The others are measured once at the final threshold.

Outputs: `models/calibrated.onnx` (the serving artefact, calibration folded in, the decision in its
metadata; the ood stage adds the input gate), `reports/metrics.json` (headline figures: `dvc metrics show`), `reports/evaluation.json`
(every metric with its CI), `reports/plots/` (DVC plots) and `reports/figures/` (PNGs, which need no CDN).
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import mlflow
import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from pipeline.arrays import Split, has_split, load_split
from pipeline.common import read_json, setup_logging, stage_errors, write_json
from pipeline.metrics import (
    apply_temperature,
    calibration_points,
    choose_threshold,
    expected_calibration_error,
    fit_calibration,
    metrics_with_ci,
    pr_points,
    roc_points,
)
from pipeline.params import EvaluateParams, ParamsError, stage_params
from pipeline.paths import (
    CALIBRATED_FILE,
    EVALUATION_FILE,
    FIGURES_DIR,
    METRICS_FILE,
    MODEL_FILE,
    PLOTS_DIR,
    RUN_FILE,
    TRAIN_SUMMARY_FILE,
)
from pipeline.registry import TrackingUnavailableError, configure_tracking
from serving.decision import CLASS_NAMES, Decision
from serving.runtime import ServingArtefact

matplotlib.use("Agg")  # files only, no display
from matplotlib import pyplot as plt

log = logging.getLogger(__name__)

SPLITS = ("external", "test", "val")
# What `dvc metrics show` prints: the figures that decide, not every CI (reports/evaluation.json has them).
HEADLINE = {
    "external": ("roc_auc", "accuracy", "sensitivity", "specificity", "ece"),
    "test": ("roc_auc", "accuracy", "sensitivity", "specificity"),
    "val": ("roc_auc",),
}


@dataclass(frozen=True)
class Fit:
    """Calibration and threshold fitted on one set of labelled raw scores."""

    temperature: float
    bias: float
    threshold: float

    def calibrate(self, raw: np.ndarray) -> np.ndarray:
        return apply_temperature(raw, self.temperature, self.bias)


def fit_decision(labels: np.ndarray, raw: np.ndarray, params: EvaluateParams) -> Fit:
    temperature, bias = fit_calibration(labels, raw, params.calibration)
    calibrated = apply_temperature(raw, temperature, bias)
    threshold = choose_threshold(labels, calibrated, params.threshold_rule, params.target_sensitivity)
    return Fit(temperature, bias, threshold)


def cross_fitted(split: Split, raw: np.ndarray, params: EvaluateParams, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold (calibrated probabilities, thresholds): each patient's images are calibrated and judged
    by a fit on the other folds' patients only."""
    folds = StratifiedGroupKFold(n_splits=params.cross_fit_folds, shuffle=True, random_state=seed)
    probabilities, thresholds = np.zeros(len(split)), np.zeros(len(split))
    for fitted_on, held_out in folds.split(raw, split.labels, groups=split.patients):
        fit = fit_decision(split.labels[fitted_on], raw[fitted_on], params)
        probabilities[held_out] = fit.calibrate(raw[held_out])
        thresholds[held_out] = fit.threshold
    return probabilities, thresholds


def evaluate(raw_scores: dict[str, np.ndarray], splits: dict[str, Split], params: EvaluateParams,
             seed: int) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(the report, each split's reported (probabilities, thresholds))."""
    chosen = params.calibration_split
    if chosen not in splits:
        raise ParamsError(f"evaluate.calibration_split is {chosen}, but there is no {chosen} split: configure "
                          "data.external (or `make repro EXTERNAL=...`), or fit on val")
    final = fit_decision(splits[chosen].labels, raw_scores[chosen], params)
    report: dict[str, Any] = {"threshold": round(final.threshold, 6), "threshold_rule": params.threshold_rule,
                              "calibration": params.calibration, "calibration_split": chosen,
                              "temperature": round(final.temperature, 4), "calibration_bias": round(final.bias, 4),
                              "splits": {}}
    reported = {}
    for name, split in splits.items():
        if name == chosen:
            probabilities, thresholds = cross_fitted(split, raw_scores[name], params, seed)
        else:
            probabilities, thresholds = final.calibrate(raw_scores[name]), np.full(len(split), final.threshold)
        reported[name] = (probabilities, thresholds)
        report["splits"][name] = {
            "images": len(split), "patients": len(set(split.patients.tolist())),
            "out_of_fold": name == chosen,
            "ece_uncalibrated": round(expected_calibration_error(split.labels, raw_scores[name]), 4),
            "metrics": metrics_with_ci(split.labels, probabilities, thresholds, params.bootstrap_resamples, seed),
        }
    return report, reported


def headline(report: dict[str, Any]) -> dict[str, Any]:
    figures: dict[str, Any] = {"threshold": report["threshold"]}
    for split, names in HEADLINE.items():
        if split in report["splits"]:
            metrics = report["splits"][split]["metrics"]
            figures[split] = {name: metrics[name]["value"] for name in names}
    return figures


def build_decision(report: dict[str, Any], params: EvaluateParams, keras_model,
                   crop: float) -> Decision:
    run = read_json(RUN_FILE)
    return Decision(
        threshold=report["threshold"], threshold_rule=params.threshold_rule,
        input_size=int(keras_model.input_shape[1]), crop=crop,
        calibration={"method": params.calibration, "temperature": report["temperature"],
                     "bias": report["calibration_bias"], "fitted_on": report["calibration_split"]},
        training_commit=run.get("git_commit", "unknown"), trained_at=run.get("trained_at"),
        run_id=run["run_id"], data_digest=run["data_digest"],
        metrics={split: values["metrics"] for split, values in report["splits"].items()},
        images={split: values["images"] for split, values in report["splits"].items()},
    )


def model_crop(keras_model) -> float:
    """The central fraction the network sees (its `centre_crop` layer), for the CAM overlay."""
    size = int(keras_model.input_shape[1])
    try:
        return keras_model.get_layer("centre_crop").height / size
    except ValueError:
        return 1.0


def write_plot_data(labels: np.ndarray, scores: np.ndarray, threshold: float | np.ndarray, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "roc.json", roc_points(labels, scores))
    write_json(folder / "precision_recall.json", pr_points(labels, scores))
    write_json(folder / "calibration.json", calibration_points(labels, scores))
    predicted = scores >= threshold
    with (folder / "confusion.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["actual", "predicted"])
        for label, decision in zip(labels, predicted):
            writer.writerow([CLASS_NAMES[label], CLASS_NAMES[int(decision)]])


def draw_figures(name: str, labels: np.ndarray, scores: np.ndarray, threshold: float | np.ndarray,
                 metrics: dict[str, Any], folder: Path, out_of_fold: bool) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    title = f"{name} split" + (" (out of fold)" if out_of_fold else "")
    paths = []
    figure, axes = plt.subplots(figsize=(4.5, 4))
    predicted = (scores >= threshold).astype(int)
    matrix = np.array([[np.sum((labels == a) & (predicted == p)) for p in (0, 1)] for a in (0, 1)])
    axes.imshow(matrix, cmap="Blues")
    for (row, col), count in np.ndenumerate(matrix):
        axes.text(col, row, str(count), ha="center", va="center", fontsize=14,
                  color="white" if count > matrix.max() / 2 else "black")
    axes.set(xticks=[0, 1], yticks=[0, 1], xticklabels=CLASS_NAMES, yticklabels=CLASS_NAMES,
             xlabel="predicted", ylabel="actual", title=f"Confusion matrix, {title}")
    paths.append(_save(figure, folder / f"{name}_confusion_matrix.png"))
    curves = {
        "roc": (roc_points(labels, scores), "fpr", "tpr", "ROC", f"AUC {metrics['roc_auc']['value']:.3f}"),
        "precision_recall": (pr_points(labels, scores), "recall", "precision", "Precision-recall",
                             f"AP {metrics['pr_auc']['value']:.3f}"),
    }
    for kind, (points, x_key, y_key, heading, legend) in curves.items():
        figure, axes = plt.subplots(figsize=(4.5, 4))
        axes.plot([p[x_key] for p in points], [p[y_key] for p in points], label=legend)
        axes.set(xlabel=x_key, ylabel=y_key, title=f"{heading}, {title}", xlim=(0, 1), ylim=(0, 1.02))
        axes.legend(loc="lower right" if kind == "roc" else "lower left")
        paths.append(_save(figure, folder / f"{name}_{kind}.png"))
    figure, axes = plt.subplots(figsize=(4.5, 4))
    bins = calibration_points(labels, scores)
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect")
    axes.plot([b["mean_predicted"] for b in bins], [b["fraction_positive"] for b in bins], marker="o",
              label=f"model (ECE {metrics['ece']['value']:.3f})")
    axes.set(xlabel="mean predicted probability", ylabel="fraction with pneumonia",
             title=f"Reliability, {title}", xlim=(0, 1), ylim=(0, 1))
    axes.legend(loc="upper left")
    paths.append(_save(figure, folder / f"{name}_calibration.png"))
    return paths


def _save(figure: Any, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def log_to_training_run(report: dict[str, Any], figures: list[Path]) -> None:
    run_id = read_json(RUN_FILE)["run_id"]
    flat = {"decision_threshold": report["threshold"], "temperature": report["temperature"],
            "calibration_bias": report["calibration_bias"]}
    for split, values in report["splits"].items():
        for name, metric in values["metrics"].items():
            for key, value in metric.items():
                if value is not None:
                    flat[f"{split}_{name}" + ("" if key == "value" else f"_{key}")] = value
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(flat)
        mlflow.set_tags({"threshold_rule": report["threshold_rule"], "calibration_split": report["calibration_split"]})
        for figure in figures:
            mlflow.log_artifact(str(figure), artifact_path="evaluation")
        mlflow.log_artifact(str(EVALUATION_FILE), artifact_path="evaluation")
        mlflow.log_artifact(str(CALIBRATED_FILE), artifact_path="serving")


def run(seed: int, params: EvaluateParams) -> dict[str, Any]:
    configure_tracking()  # first: an unreachable store fails in seconds, not after scoring and plotting
    import keras  # here, not at the top: the fitting and reporting functions need no TensorFlow

    from pipeline import artefact

    keras_model = keras.models.load_model(MODEL_FILE, compile=False, safe_mode=True)
    crop = model_crop(keras_model)
    size = int(keras_model.input_shape[1])
    # The same ONNX graph as the final artefact, before calibration: evaluation scores what is served.
    uncalibrated = ServingArtefact(artefact.build(keras_model, Decision(0.5, "none", size, crop=crop)), "uncalibrated")
    splits = {name: load_split(name) for name in SPLITS if has_split(name)}
    raw_scores = {name: uncalibrated.probabilities(split.images) for name, split in splits.items()}
    report, reported = evaluate(raw_scores, splits, params, seed)
    report["train"] = read_json(TRAIN_SUMMARY_FILE)
    decision = build_decision(report, params, keras_model, crop)
    CALIBRATED_FILE.parent.mkdir(parents=True, exist_ok=True)
    CALIBRATED_FILE.write_bytes(artefact.build(keras_model, decision))
    write_json(EVALUATION_FILE, report)
    write_json(METRICS_FILE, headline(report))
    figures = []
    for name in ("external", "test"):
        if name in splits:
            probabilities, thresholds = reported[name]
            write_plot_data(splits[name].labels, probabilities, thresholds, PLOTS_DIR / name)
            figures += draw_figures(name, splits[name].labels, probabilities, thresholds,
                                    report["splits"][name]["metrics"], FIGURES_DIR,
                                    report["splits"][name]["out_of_fold"])
    log_to_training_run(report, figures)
    return report


def main() -> None:
    setup_logging()
    with stage_errors(log, TrackingUnavailableError, ParamsError):
        report = run(*stage_params("evaluate"))
    log.info("threshold %.4f (fitted on %s); %s", report["threshold"], report["calibration_split"], headline(report))


if __name__ == "__main__":
    main()
