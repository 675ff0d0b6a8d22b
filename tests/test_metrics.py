"""Metric code: threshold rules, bootstrap CIs, calibration."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from pipeline.metrics import (
    apply_temperature,
    calibration_points,
    choose_threshold,
    expected_calibration_error,
    fit_platt,
    fit_temperature,
    metrics_with_ci,
    point_metrics,
)


@pytest.fixture
def scored():
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(300), np.ones(700)].astype(int)
    scores = np.clip(np.r_[rng.normal(0.3, 0.15, 300), rng.normal(0.7, 0.15, 700)], 0, 1)
    return labels, scores


def test_perfect_separation_gives_perfect_metrics():
    labels = np.array([0, 0, 1, 1])
    metrics = point_metrics(labels, np.array([0.1, 0.2, 0.8, 0.9]), threshold=0.5)
    assert metrics["roc_auc"] == metrics["accuracy"] == metrics["sensitivity"] == metrics["specificity"] == 1.0
    assert metrics["brier"] == pytest.approx((0.01 + 0.04 + 0.04 + 0.01) / 4)


def test_sensitivity_rule_reaches_its_target(scored):
    labels, scores = scored
    threshold = choose_threshold(labels, scores, "sensitivity", target_sensitivity=0.95)
    assert point_metrics(labels, scores, threshold)["sensitivity"] >= 0.95
    slightly_higher = point_metrics(labels, scores, threshold + 1e-3)["sensitivity"]
    assert slightly_higher < 0.95 or threshold >= 1.0


def test_sensitivity_bound_rule_keeps_a_margin_that_shrinks_with_more_positives(scored):
    labels, scores = scored
    plain = choose_threshold(labels, scores, "sensitivity", target_sensitivity=0.9)
    bounded = choose_threshold(labels, scores, "sensitivity_bound", target_sensitivity=0.9)
    sensitivity = point_metrics(labels, scores, bounded)["sensitivity"]
    positives = int(labels.sum())
    # The observed sensitivity sits above the target by a margin, and its Wilson lower bound reaches it.
    assert bounded < plain and sensitivity > 0.9
    assert binomtest(round(sensitivity * positives), positives).proportion_ci(method="wilson").low >= 0.9
    repeated = np.tile(labels, 10), np.tile(scores, 10)
    more_data = choose_threshold(*repeated, "sensitivity_bound", target_sensitivity=0.9)
    assert bounded <= more_data <= plain + 1e-9
    assert choose_threshold(labels, scores, "sensitivity_bound", target_sensitivity=1.0) == pytest.approx(
        scores.min()), "an unreachable target falls back to the threshold that calls every image positive"


def test_youden_rule_maximises_sensitivity_plus_specificity(scored):
    labels, scores = scored
    best = choose_threshold(labels, scores, "youden")
    youden = lambda t: sum(point_metrics(labels, scores, t)[k] for k in ("sensitivity", "specificity"))
    assert all(youden(best) >= youden(t) - 1e-9 for t in np.linspace(0.05, 0.95, 19))


def test_unknown_rule_is_a_value_error(scored):
    with pytest.raises(ValueError, match="threshold rule"):
        choose_threshold(*scored, rule="magic")


def test_bootstrap_interval_brackets_the_estimate_and_is_reproducible(scored):
    labels, scores = scored
    first = metrics_with_ci(labels, scores, 0.5, resamples=200, seed=1)
    assert first == metrics_with_ci(labels, scores, 0.5, resamples=200, seed=1)
    for name, value in first.items():
        assert value["ci_low"] <= value["value"] <= value["ci_high"], name
    assert 0.0 < first["roc_auc"]["ci_high"] - first["roc_auc"]["ci_low"] < 0.1


def test_calibration_error_is_small_for_calibrated_scores_and_large_otherwise():
    rng = np.random.default_rng(0)
    probabilities = rng.uniform(size=20000)
    labels = (rng.uniform(size=20000) < probabilities).astype(int)
    assert expected_calibration_error(labels, probabilities) < 0.02
    assert expected_calibration_error(labels, probabilities ** 4) > 0.15
    points = calibration_points(labels, probabilities)
    assert len(points) == 10 and sum(point["count"] for point in points) == 20000


def test_platt_scaling_fixes_a_shift_that_temperature_cannot():
    rng = np.random.default_rng(2)
    true_logits = rng.normal(1, 2, 20000)
    labels = (rng.uniform(size=20000) < 1 / (1 + np.exp(-true_logits))).astype(int)
    # What training on harder augmented images does: scores too low by a constant logit, a bit too sharp.
    shifted = 1 / (1 + np.exp(-(1.5 * true_logits - 2.0)))
    temperature, bias = fit_platt(labels, shifted)
    assert temperature == pytest.approx(1.5, rel=0.05) and bias == pytest.approx(2.0 / 1.5, abs=0.1)
    platt_ece = expected_calibration_error(labels, apply_temperature(shifted, temperature, bias))
    temperature_only = apply_temperature(shifted, fit_temperature(labels, shifted))
    assert platt_ece < 0.01 < expected_calibration_error(labels, temperature_only)


def test_temperature_scaling_recovers_a_known_overconfidence():
    rng = np.random.default_rng(1)
    true_logits = rng.normal(0, 2, 20000)
    labels = (rng.uniform(size=20000) < 1 / (1 + np.exp(-true_logits))).astype(int)
    overconfident = 1 / (1 + np.exp(-3 * true_logits))  # the same ranking, three times too sharp
    temperature = fit_temperature(labels, overconfident)
    assert temperature == pytest.approx(3.0, rel=0.05)
    calibrated = apply_temperature(overconfident, temperature)
    assert expected_calibration_error(labels, calibrated) < expected_calibration_error(labels, overconfident) / 3
    order = np.argsort(overconfident)
    assert (np.diff(calibrated[order]) >= 0).all()  # monotone: rankings, hence AUCs, are unchanged


def test_triage_band_reaches_its_targets_on_the_images_it_was_fitted_on():
    from pipeline.metrics import fit_triage, triage_metrics

    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, 400)
    probabilities = 1 / (1 + np.exp(-(3.0 * labels - 1.5 + rng.normal(0, 1.3, 400))))
    low, high = fit_triage(labels, probabilities, 0.5, accuracy=0.95, sensitivity=0.97)
    assert low <= 0.5 <= high
    figures = triage_metrics(labels, probabilities, low, high)
    assert figures["decided_accuracy"] >= 0.95 and figures["decided_sensitivity"] >= 0.97
    assert 0 < figures["review_share"] < 1
    # The widest band that still holds: narrowing it by one image on either side breaks a target.
    below = np.sort(probabilities[probabilities >= low])
    widened = triage_metrics(labels, probabilities, below[0] + 1e-12, high)
    above = np.sort(probabilities[probabilities < high])
    widened_high = triage_metrics(labels, probabilities, low, above[-1])
    for wider in (widened, widened_high):
        assert wider["decided_accuracy"] < 0.95 or wider["decided_sensitivity"] < 0.97 or wider == figures


def test_triage_with_unreachable_targets_sends_everything_to_review():
    from pipeline.metrics import fit_triage, triage_metrics

    labels = np.array([0, 1] * 50)
    probabilities = np.full(100, 0.5)
    low, high = fit_triage(labels, probabilities, 0.5, accuracy=0.99, sensitivity=0.99)
    assert triage_metrics(labels, probabilities, low, high)["review_share"] == 1.0
