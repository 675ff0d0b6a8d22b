"""Stage: calibrate, choose the threshold, measure every split with bootstrap CIs, write the decision.

Calibration (`evaluate.calibration`) and the threshold (`evaluate.threshold_rule`) are fitted on
`evaluate.calibration_split`: validation, or the external set (the site the model will see). The split
that fitted them is reported out of fold: cross-fitting by patient, so no figure is measured on the
images that chose it. The others are measured once at the final threshold.

The same split also fits the two heads beside the diagnosis, each reported out of fold there too:
- the bacterial/viral head's calibration (Platt, on that split's pneumonia images whose kind is known);
  a pneumonia is called VIRAL when its calibrated probability reaches 0.5 (the likelier kind);
- triage: two thresholds around the decision threshold, the fewest X-rays sent to REVIEW while those
  triaged NORMAL or PNEUMONIA reach `evaluate.triage_accuracy` and `evaluate.triage_sensitivity`.
Errors are also broken down by subgroup (normal `IM-*` / `NORMAL2-*` files, bacterial / viral).

Outputs: `models/decision.json` (the decision: threshold, calibration, triage and the figures the model card
shows; the assemble stage puts it into the serving artefact), `reports/metrics.json` (headline figures: `dvc metrics show`), `reports/evaluation.json`
(every metric with its CI), `reports/plots/` (DVC plots) and `reports/figures/` (PNGs, which need no CDN).
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import matplotlib
import mlflow
import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from pipeline.arrays import NO_SUBTYPE, Split, has_split, load_split
from pipeline.common import read_json, setup_logging, stage_errors, write_json
from pipeline.metrics import (
    apply_temperature,
    calibration_points,
    choose_threshold,
    expected_calibration_error,
    fit_calibration,
    fit_triage,
    metrics_with_ci,
    pr_points,
    roc_points,
    triage_metrics,
)
from pipeline.params import EvaluateParams, ParamsError, stage_params
from pipeline.paths import (
    DECISION_FILE,
    EVALUATION_FILE,
    FIGURES_DIR,
    MANIFEST_FILE,
    METRICS_FILE,
    MODEL_FILE,
    PLOTS_DIR,
    RUN_FILE,
    TRAIN_SUMMARY_FILE,
)
from pipeline.registry import TrackingUnavailableError, configure_tracking
from scoring.decision import CLASS_NAMES, Decision
from scoring.runtime import Scores, ServingArtefact

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
SUBTYPE_HEADLINE = ("roc_auc", "accuracy")
TRIAGE_HEADLINE = ("review_share", "decided_accuracy", "decided_sensitivity")
# The calibrated probability at which a pneumonia is called VIRAL: the likelier of the two kinds.
SUBTYPE_THRESHOLD = 0.5


@dataclass(frozen=True)
class Fit:
    """Calibration, threshold and triage band fitted on one set of labelled raw scores."""

    temperature: float
    bias: float
    threshold: float
    normal_below: float
    pneumonia_from: float

    def calibrate(self, raw: np.ndarray) -> np.ndarray:
        return apply_temperature(raw, self.temperature, self.bias)


def fit_decision(labels: np.ndarray, raw: np.ndarray, params: EvaluateParams) -> Fit:
    temperature, bias = fit_calibration(labels, raw, params.calibration)
    calibrated = apply_temperature(raw, temperature, bias)
    threshold = choose_threshold(labels, calibrated, params.threshold_rule, params.target_sensitivity)
    band = fit_triage(labels, calibrated, threshold, params.triage_accuracy, params.triage_sensitivity)
    return Fit(temperature, bias, threshold, *band)


@dataclass(frozen=True)
class Reported:
    """One split's figures as reported: calibrated probabilities and, per image, the threshold and triage
    band that judged it (out of fold on the split that fitted them) and the calibrated viral probability."""

    probabilities: np.ndarray
    thresholds: np.ndarray
    normal_below: np.ndarray
    pneumonia_from: np.ndarray
    viral: np.ndarray


def _folds(labels: np.ndarray, groups: np.ndarray, params: EvaluateParams, seed: int):
    folds = StratifiedGroupKFold(n_splits=params.cross_fit_folds, shuffle=True, random_state=seed)
    return folds.split(labels, labels, groups=groups)


def cross_fitted(split: Split, raw: np.ndarray, params: EvaluateParams, seed: int) -> Reported:
    """Out-of-fold figures: each patient's images are calibrated, thresholded and triaged by a fit on the
    other folds' patients only (the viral calibration is cross-fitted apart, see `cross_fitted_viral`)."""
    values = {name: np.zeros(len(split)) for name in ("probabilities", "thresholds", "normal_below", "pneumonia_from")}
    for fitted_on, held_out in _folds(split.labels, split.patients, params, seed):
        fit = fit_decision(split.labels[fitted_on], raw[fitted_on], params)
        values["probabilities"][held_out] = fit.calibrate(raw[held_out])
        values["thresholds"][held_out] = fit.threshold
        values["normal_below"][held_out] = fit.normal_below
        values["pneumonia_from"][held_out] = fit.pneumonia_from
    return Reported(**values, viral=np.zeros(len(split)))


def fit_viral(split: Split, raw_viral: np.ndarray) -> tuple[float, float]:
    """Platt scaling of the viral head on the split's pneumonia images whose kind is known."""
    known = split.subtypes != NO_SUBTYPE
    return _platt(split.subtypes[known], raw_viral[known])


def _platt(kinds: np.ndarray, raw: np.ndarray) -> tuple[float, float]:
    """Platt's (temperature, bias); none (1, 0) where the images hold fewer than two of either kind."""
    if min(np.sum(kinds == 0), np.sum(kinds == 1)) < 2:
        return 1.0, 0.0
    return fit_calibration(kinds, raw, "platt")


def cross_fitted_viral(split: Split, raw_viral: np.ndarray, params: EvaluateParams, seed: int) -> np.ndarray:
    """Out-of-fold calibrated viral probabilities (grouped by patient, stratified by kind); raw elsewhere."""
    calibrated = raw_viral.copy()
    known = np.flatnonzero(split.subtypes != NO_SUBTYPE)
    kinds, patients = split.subtypes[known], split.patients[known]
    if len(set(patients.tolist())) < params.cross_fit_folds or len(set(kinds.tolist())) < 2:
        return calibrated  # too few pneumonias of known kind to cross-fit (a tiny or unnamed data set)
    for fitted_on, held_out in _folds(kinds, patients, params, seed):
        temperature, bias = _platt(kinds[fitted_on], raw_viral[known[fitted_on]])
        calibrated[known[held_out]] = apply_temperature(raw_viral[known[held_out]], temperature, bias)
    return calibrated


def evaluate(raw_scores: dict[str, Scores], splits: dict[str, Split], params: EvaluateParams,
             seed: int) -> tuple[dict[str, Any], dict[str, Reported]]:
    """(the report, each split's reported figures)."""
    chosen = params.calibration_split
    if chosen not in splits:
        raise ParamsError(f"evaluate.calibration_split is {chosen}, but there is no {chosen} split: configure "
                          "data.external (or `make repro EXTERNAL=...`), or fit on val")
    final = fit_decision(splits[chosen].labels, raw_scores[chosen].probability, params)
    viral_fit = fit_viral(splits[chosen], raw_scores[chosen].viral)
    report: dict[str, Any] = {"threshold": round(final.threshold, 6), "threshold_rule": params.threshold_rule,
                              "calibration": params.calibration, "calibration_split": chosen,
                              "temperature": round(final.temperature, 4), "calibration_bias": round(final.bias, 4),
                              "subtype_calibration": {"method": "platt", "temperature": round(viral_fit[0], 4),
                                                      "bias": round(viral_fit[1], 4), "fitted_on": chosen},
                              "triage": {"normal_below": round(final.normal_below, 6),
                                         "pneumonia_from": round(final.pneumonia_from, 6),
                                         "target_accuracy": params.triage_accuracy,
                                         "target_sensitivity": params.triage_sensitivity, "fitted_on": chosen},
                              "splits": {}}
    reported = {}
    for name, split in splits.items():
        raw = raw_scores[name]
        if name == chosen:
            figures = replace(cross_fitted(split, raw.probability, params, seed),
                              viral=cross_fitted_viral(split, raw.viral, params, seed))
        else:
            figures = Reported(final.calibrate(raw.probability), *(np.full(len(split), value) for value in
                               (final.threshold, final.normal_below, final.pneumonia_from)),
                               viral=apply_temperature(raw.viral, *viral_fit))
        reported[name] = figures
        report["splits"][name] = split_report(split, raw.probability, figures, name == chosen, params, seed)
    return report, reported


def split_report(split: Split, raw: np.ndarray, figures: Reported, out_of_fold: bool, params: EvaluateParams,
                 seed: int) -> dict[str, Any]:
    known = split.subtypes != NO_SUBTYPE
    return {
        "images": len(split), "patients": len(set(split.patients.tolist())), "out_of_fold": out_of_fold,
        "ece_uncalibrated": round(expected_calibration_error(split.labels, raw), 4),
        "metrics": metrics_with_ci(split.labels, figures.probabilities, figures.thresholds,
                                   params.bootstrap_resamples, seed),
        # Bacterial (0) or viral (1), among the pneumonia images whose kind is known.
        "subtype": {"images": int(known.sum()),
                    "metrics": metrics_with_ci(split.subtypes[known], figures.viral[known], SUBTYPE_THRESHOLD,
                                               params.bootstrap_resamples, seed) if known.any() else {}},
        "triage": triage_metrics(split.labels, figures.probabilities, figures.normal_below, figures.pneumonia_from),
    }


def subgroups(split: Split, figures: Reported, files: list[str]) -> dict[str, dict[str, Any]]:
    """Images and the share called PNEUMONIA at the reported thresholds, per subgroup: normal `IM-*` and
    `NORMAL2-IM-*` files (two batches of normals), bacterial and viral pneumonia."""
    called = figures.probabilities >= figures.thresholds
    normal2 = np.array([Path(name).name.upper().startswith("NORMAL2-") for name in files], dtype=bool)
    groups = {"normal_IM": (split.labels == 0) & ~normal2, "normal_NORMAL2": (split.labels == 0) & normal2,
              "bacterial": split.subtypes == 0, "viral": split.subtypes == 1}
    return {name: {"images": int(members.sum()),
                   "called_pneumonia": round(float(called[members].mean()), 4) if members.any() else None}
            for name, members in groups.items()}


def split_files(name: str) -> list[str]:
    """The files of a prepared split, in the order of its arrays (the manifest keeps that order)."""
    with MANIFEST_FILE.open(encoding="utf-8", newline="") as handle:
        return [row["file"] for row in csv.DictReader(handle) if row["split"] == name]


def headline(report: dict[str, Any]) -> dict[str, Any]:
    figures: dict[str, Any] = {"threshold": report["threshold"]}
    for split, names in HEADLINE.items():
        if split in report["splits"]:
            metrics = report["splits"][split]["metrics"]
            figures[split] = {name: metrics[name]["value"] for name in names}
    chosen = report["splits"].get(report["calibration_split"])
    if chosen is not None:
        subtype = chosen["subtype"]["metrics"]
        figures["subtype"] = {name: subtype[name]["value"] if subtype else None for name in SUBTYPE_HEADLINE}
        figures["triage"] = {name: chosen["triage"][name] for name in TRIAGE_HEADLINE}
    return figures


def build_decision(report: dict[str, Any], params: EvaluateParams, keras_model,
                   crop: float) -> Decision:
    run = read_json(RUN_FILE)
    return Decision(
        threshold=report["threshold"], threshold_rule=params.threshold_rule,
        target_sensitivity=params.target_sensitivity if params.threshold_rule != "youden" else None,
        input_size=int(keras_model.input_shape[1]), crop=crop,
        calibration={"method": params.calibration, "temperature": report["temperature"],
                     "bias": report["calibration_bias"], "fitted_on": report["calibration_split"]},
        subtype_threshold=SUBTYPE_THRESHOLD, subtype_calibration=report["subtype_calibration"],
        triage={**report["triage"], "rule": "fewest_reviews"},
        training_commit=run.get("git_commit", "unknown"), trained_at=run.get("trained_at"),
        run_id=run["run_id"], data_digest=run["data_digest"], network=run.get("network", {}),
        metrics={split: values["metrics"] for split, values in report["splits"].items()},
        images={split: values["images"] for split, values in report["splits"].items()},
        subtype_metrics={split: values["subtype"]["metrics"] for split, values in report["splits"].items()},
        triage_metrics={split: values["triage"] for split, values in report["splits"].items()},
        subgroups=report.get("subgroups", {}),
    )


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
            "calibration_bias": report["calibration_bias"], "triage_normal_below": report["triage"]["normal_below"],
            "triage_pneumonia_from": report["triage"]["pneumonia_from"]}
    for split, values in report["splits"].items():
        for prefix, metrics in ((split, values["metrics"]), (f"{split}_subtype", values["subtype"]["metrics"])):
            for name, metric in metrics.items():
                for key, value in metric.items():
                    if value is not None:
                        flat[f"{prefix}_{name}" + ("" if key == "value" else f"_{key}")] = value
        flat.update({f"{split}_triage_{name}": value for name, value in values["triage"].items() if value is not None})
    for split, groups in report.get("subgroups", {}).items():
        flat.update({f"{split}_{group}_called_pneumonia": figures["called_pneumonia"]
                     for group, figures in groups.items() if figures["called_pneumonia"] is not None})
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(flat)
        mlflow.set_tags({"threshold_rule": report["threshold_rule"], "calibration_split": report["calibration_split"]})
        for figure in figures:
            mlflow.log_artifact(str(figure), artifact_path="evaluation")
        mlflow.log_artifact(str(EVALUATION_FILE), artifact_path="evaluation")
        mlflow.log_artifact(str(DECISION_FILE), artifact_path="serving")


def run(seed: int, params: EvaluateParams) -> dict[str, Any]:
    configure_tracking()  # first: an unreachable store fails in seconds, not after scoring and plotting
    import keras  # here, not at the top: the fitting and reporting functions need no TensorFlow

    from pipeline import artefact
    from pipeline.model import model_parts

    keras_model = keras.models.load_model(MODEL_FILE, compile=False, safe_mode=True)
    crop = model_parts(keras_model).crop  # the central fraction the network sees, for the CAM overlay
    size = int(keras_model.input_shape[1])
    # The same ONNX graph as the final artefact, before calibration: evaluation scores what is served.
    uncalibrated = ServingArtefact(artefact.build(keras_model, Decision(0.5, "none", size, crop=crop)), "uncalibrated")
    splits = {name: load_split(name) for name in SPLITS if has_split(name)}
    raw_scores = {name: uncalibrated.scores(split.images) for name, split in splits.items()}
    report, reported = evaluate(raw_scores, splits, params, seed)
    report["subgroups"] = {name: subgroups(splits[name], reported[name], split_files(name)) for name in splits}
    report["train"] = read_json(TRAIN_SUMMARY_FILE)
    decision = build_decision(report, params, keras_model, crop)
    write_json(DECISION_FILE, json.loads(decision.to_json()))
    write_json(EVALUATION_FILE, report)
    write_json(METRICS_FILE, headline(report))
    figures = []
    for name in ("external", "test"):
        if name in splits:
            probabilities, thresholds = reported[name].probabilities, reported[name].thresholds
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
