"""Binary classification metrics with bootstrap confidence intervals, threshold rules and calibration."""

from __future__ import annotations

import warnings

import numpy as np
from scipy.stats import binomtest
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

THRESHOLD_RULES = ("youden", "sensitivity", "sensitivity_bound")


def choose_threshold(labels: np.ndarray, probabilities: np.ndarray, rule: str,
                     target_sensitivity: float = 0.95) -> float:
    """Decision threshold from validation predictions only.

    youden: maximise sensitivity + specificity - 1.
    sensitivity: the highest threshold whose sensitivity is at least `target_sensitivity`
    (a screening tool should rather over-call than miss pneumonia).
    sensitivity_bound: the highest threshold whose sensitivity's 95% Wilson lower bound is at least
    `target_sensitivity`: the target then holds with confidence despite the validation split's size,
    and every point of specificity that margin allows is kept.
    """
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"unknown threshold rule '{rule}': use one of {THRESHOLD_RULES}")
    false_positive_rate, true_positive_rate, thresholds = roc_curve(labels, probabilities)
    thresholds = np.clip(thresholds, 0.0, 1.0)  # roc_curve's first threshold is +inf
    if rule == "youden":
        best = int(np.argmax(true_positive_rate - false_positive_rate))
    elif rule == "sensitivity":
        best = int(np.argmax(true_positive_rate >= target_sensitivity))
    else:
        best = _first_bound_reaching(true_positive_rate, int(np.sum(labels == 1)), target_sensitivity)
    return float(thresholds[best])


def _first_bound_reaching(true_positive_rate: np.ndarray, positives: int, target: float) -> int:
    """Index of the first (highest) ROC threshold whose sensitivity's Wilson lower bound reaches target;
    the last (catch-all) threshold when none does."""
    for index, rate in enumerate(true_positive_rate):
        hits = round(rate * positives)
        if binomtest(hits, positives).proportion_ci(0.95, method="wilson").low >= target:
            return index
    return len(true_positive_rate) - 1


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, bins: int = 10) -> float:
    """Mean |observed rate - mean predicted| over equal-width bins, weighted by bin size."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(probabilities, edges[1:-1]), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        in_bin = index == b
        if in_bin.any():
            error += in_bin.mean() * abs(labels[in_bin].mean() - probabilities[in_bin].mean())
    return float(error)


def point_metrics(labels: np.ndarray, probabilities: np.ndarray, threshold: float | np.ndarray) -> dict[str, float]:
    """`threshold` is one value, or one per image (out-of-fold decisions, each at its own fold's threshold)."""
    labels = np.asarray(labels).astype(int)
    predicted = (probabilities >= threshold).astype(int)
    true_pos = int(np.sum((predicted == 1) & (labels == 1)))
    true_neg = int(np.sum((predicted == 0) & (labels == 0)))
    false_pos = int(np.sum((predicted == 1) & (labels == 0)))
    false_neg = int(np.sum((predicted == 0) & (labels == 1)))
    sensitivity = _ratio(true_pos, true_pos + false_neg)
    precision = _ratio(true_pos, true_pos + false_pos)
    both_classes = len(np.unique(labels)) == 2
    return {
        "roc_auc": float(roc_auc_score(labels, probabilities)) if both_classes else float("nan"),
        "pr_auc": float(average_precision_score(labels, probabilities)) if both_classes else float("nan"),
        "accuracy": _ratio(true_pos + true_neg, len(labels)),
        "sensitivity": sensitivity,
        "specificity": _ratio(true_neg, true_neg + false_pos),
        "precision": precision,
        "f1": _ratio(2 * precision * sensitivity, precision + sensitivity),
        "brier": float(np.mean((probabilities - labels) ** 2)),
        "ece": expected_calibration_error(labels, probabilities),
    }


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else float("nan")


def metrics_with_ci(labels: np.ndarray, probabilities: np.ndarray, threshold: float | np.ndarray,
                    resamples: int, seed: int, confidence: float = 0.95) -> dict[str, dict[str, float]]:
    """Each metric with a percentile bootstrap CI (resampling images, stratified by class). `threshold` is
    one value or one per image."""
    labels = np.asarray(labels).astype(int)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    thresholds = np.broadcast_to(np.asarray(threshold, dtype=np.float64), probabilities.shape)
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == value) for value in (0, 1)]
    samples: dict[str, list[float]] = {}
    for _ in range(resamples):
        index = np.concatenate([rng.choice(members, size=len(members)) for members in by_class if len(members)])
        for name, value in point_metrics(labels[index], probabilities[index], thresholds[index]).items():
            samples.setdefault(name, []).append(value)
    tail = 100 * (1 - confidence) / 2
    result = {}
    for name, value in point_metrics(labels, probabilities, thresholds).items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN resamples: the CI is undefined too
            low, high = np.nanpercentile(samples[name], [tail, 100 - tail]) if resamples else (np.nan, np.nan)
        result[name] = {"value": _rounded(value), "ci_low": _rounded(low), "ci_high": _rounded(high)}
    return result


def _rounded(value: float) -> float | None:
    """JSON has no NaN: an undefined metric (e.g. precision with no positive calls) is written as null."""
    return None if np.isnan(value) else round(float(value), 4)


def roc_points(labels: np.ndarray, probabilities: np.ndarray) -> list[dict[str, float]]:
    fpr, tpr, _ = roc_curve(labels, probabilities)
    return [{"fpr": round(float(x), 5), "tpr": round(float(y), 5)} for x, y in zip(fpr, tpr)]


def pr_points(labels: np.ndarray, probabilities: np.ndarray) -> list[dict[str, float]]:
    precision, recall, _ = precision_recall_curve(labels, probabilities)
    return [{"recall": round(float(r), 5), "precision": round(float(p), 5)} for r, p in zip(recall, precision)]


def calibration_points(labels: np.ndarray, probabilities: np.ndarray, bins: int = 10) -> list[dict[str, float]]:
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(probabilities, edges[1:-1]), 0, bins - 1)
    points = []
    for b in range(bins):
        in_bin = index == b
        if in_bin.any():
            points.append({"mean_predicted": round(float(probabilities[in_bin].mean()), 5),
                           "fraction_positive": round(float(labels[in_bin].mean()), 5),
                           "count": int(in_bin.sum())})
    return points


def _logits(probabilities: np.ndarray) -> np.ndarray:
    clipped = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-7, 1 - 1e-7)
    return np.log(clipped / (1 - clipped))


def apply_temperature(probabilities: np.ndarray, temperature: float, bias: float = 0.0) -> np.ndarray:
    """Rescale confidence: sigmoid(logit(p) / T + bias). T > 1 softens an over-confident model, a bias
    shifts a model whose scores sit systematically high or low; order is kept."""
    return 1.0 / (1.0 + np.exp(-(_logits(probabilities) / temperature + bias)))


def fit_temperature(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """The temperature minimising the log-loss (Guo et al. 2017, temperature scaling)."""
    return _fit_logistic(labels, probabilities, with_bias=False)[0]


def fit_platt(labels: np.ndarray, probabilities: np.ndarray) -> tuple[float, float]:
    """(temperature, bias) minimising the log-loss (Platt scaling on the logit).

    Temperature alone cannot fix a model whose logits are shifted rather than stretched, which is what
    training on harder (augmented) images than it is evaluated on does, or a new site's images.
    """
    return _fit_logistic(labels, probabilities, with_bias=True)


def fit_calibration(labels: np.ndarray, probabilities: np.ndarray, method: str) -> tuple[float, float]:
    """(temperature, bias) for sigmoid(logit / temperature + bias): none, temperature or platt."""
    if method == "temperature":
        return fit_temperature(labels, probabilities), 0.0
    if method == "platt":
        return fit_platt(labels, probabilities)
    if method == "none":
        return 1.0, 0.0
    raise ValueError(f"unknown calibration '{method}': use none, temperature or platt")


def _fit_logistic(labels: np.ndarray, probabilities: np.ndarray, with_bias: bool) -> tuple[float, float]:
    from scipy.optimize import minimize

    labels = np.asarray(labels, dtype=np.float64)
    logits = _logits(probabilities)

    def negative_log_likelihood(values: np.ndarray) -> float:
        scaled = logits / np.exp(values[0]) + values[1]
        return float(np.mean(np.logaddexp(0.0, -scaled) * labels + np.logaddexp(0.0, scaled) * (1 - labels)))

    bias_bounds = (-10.0, 10.0) if with_bias else (0.0, 0.0)
    result = minimize(negative_log_likelihood, x0=np.zeros(2), method="L-BFGS-B",
                      bounds=[(np.log(0.05), np.log(20.0)), bias_bounds])
    return float(np.exp(result.x[0])), float(result.x[1])


def fit_triage(labels: np.ndarray, probabilities: np.ndarray, threshold: float, accuracy: float,
               sensitivity: float) -> tuple[float, float]:
    """(normal_below, pneumonia_from) around `threshold` that leave the fewest images to REVIEW while the
    images triaged NORMAL (p < normal_below) or PNEUMONIA (p >= pneumonia_from) reach `accuracy` and, among
    the pneumonia images decided, `sensitivity`. (0, 1) sends everything to review when nothing reaches it."""
    labels = np.asarray(labels).astype(int)
    lows = np.unique(np.append(probabilities[probabilities <= threshold], threshold))
    above = probabilities[probabilities >= threshold]
    highs = np.unique(np.concatenate([above, [threshold, min(1.0, float(above.max(initial=threshold)) + 1e-9)]]))
    # Per candidate: counts of normals and pneumonias below each low / at or above each high.
    normal_low = (probabilities[labels == 0][None, :] < lows[:, None]).sum(axis=1)
    missed_low = (probabilities[labels == 1][None, :] < lows[:, None]).sum(axis=1)
    caught_high = (probabilities[labels == 1][None, :] >= highs[:, None]).sum(axis=1)
    false_high = (probabilities[labels == 0][None, :] >= highs[:, None]).sum(axis=1)
    correct = normal_low[:, None] + caught_high[None, :]
    decided = correct + missed_low[:, None] + false_high[None, :]
    positives = caught_high[None, :] + missed_low[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        good = ((decided > 0) & (correct >= accuracy * decided)
                & ((positives == 0) | (caught_high[None, :] >= sensitivity * positives)))
    if not good.any():
        return 0.0, 1.0
    low, high = np.unravel_index(np.argmax(np.where(good, decided, -1)), good.shape)
    return float(lows[low]), float(highs[high])


def triage_metrics(labels: np.ndarray, probabilities: np.ndarray, normal_below: float | np.ndarray,
                   pneumonia_from: float | np.ndarray) -> dict[str, float | None]:
    """The share sent to REVIEW, and accuracy, sensitivity and specificity among the images decided
    (bounds are one value, or one per image for out-of-fold figures)."""
    labels = np.asarray(labels).astype(int)
    normal, pneumonia = probabilities < normal_below, probabilities >= pneumonia_from
    decided = normal | pneumonia
    true_pos, true_neg = np.sum(pneumonia & (labels == 1)), np.sum(normal & (labels == 0))
    figures = {
        "review_share": _ratio(np.sum(~decided), len(labels)),
        "decided_accuracy": _ratio(true_pos + true_neg, np.sum(decided)),
        "decided_sensitivity": _ratio(true_pos, np.sum(decided & (labels == 1))),
        "decided_specificity": _ratio(true_neg, np.sum(decided & (labels == 0))),
    }
    return {name: _rounded(value) for name, value in figures.items()}
