"""The evaluate stage's arithmetic, on synthetic scores (no training, no model): cross-fitting by patient,
which split is reported out of fold, and the headline `dvc metrics show` prints."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from pipeline.arrays import Split
from pipeline.evaluate import cross_fitted, evaluate, fit_decision, headline
from pipeline.params import ParamsError
from tests.helpers import project_params

FOLDS = 4


@pytest.fixture(scope="module")
def params():
    # Validation, so that a test without the external split still has its calibration split.
    return replace(project_params().evaluate, calibration_split="val", cross_fit_folds=FOLDS,
                   bootstrap_resamples=20)


def synthetic(seed: int, patients: int, name: str) -> tuple[Split, np.ndarray]:
    """(a split of `patients` patients with 1 to 4 images each and one label each, raw scores that
    separate the classes imperfectly and sit too high, as an uncalibrated model's would)."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 5, patients)
    patient_labels = np.arange(patients) % 2
    ids = np.repeat([f"{name}-p{index:03d}" for index in range(patients)], counts)
    labels = np.repeat(patient_labels, counts).astype(np.uint8)
    logits = 2.0 * labels - 0.3 + rng.normal(0.0, 1.2, len(labels))
    images = np.zeros((len(labels), 8, 8), dtype=np.uint8)
    return Split(images, labels, ids), 1.0 / (1.0 + np.exp(-logits))


@pytest.fixture(scope="module")
def data() -> tuple[dict[str, Split], dict[str, np.ndarray]]:
    splits, scores = {}, {}
    for seed, name in enumerate(("val", "test", "external")):
        splits[name], scores[name] = synthetic(seed, 40, name)
    return splits, scores


def test_cross_fitting_is_out_of_fold_and_keeps_each_patient_in_one_fold(data, params):
    splits, scores = data
    split, raw = splits["val"], scores["val"]
    probabilities, thresholds = cross_fitted(split, raw, params, seed=3)
    assert probabilities.shape == thresholds.shape == (len(split),)
    assert ((probabilities > 0) & (probabilities < 1)).all()
    # A threshold per image, one per fold: the folds are told apart by it.
    folds = {value: np.flatnonzero(thresholds == value) for value in np.unique(thresholds)}
    assert len(folds) == FOLDS
    assert sorted(np.concatenate(list(folds.values())).tolist()) == list(range(len(split)))
    patients_seen = set()
    for held_out in folds.values():
        patients = set(split.patients[held_out].tolist())
        assert not patients & patients_seen, "a patient's images were split across folds"
        patients_seen |= patients
        # Each fold was judged by a fit on the other folds' images only.
        others = np.setdiff1d(np.arange(len(split)), held_out)
        fitted = fit_decision(split.labels[others], raw[others], params)
        assert thresholds[held_out[0]] == fitted.threshold
        np.testing.assert_allclose(probabilities[held_out], fitted.calibrate(raw[held_out]), rtol=1e-12)
    assert patients_seen == set(split.patients.tolist())
    # Not the in-sample fit on every image (which would have seen the images it judges).
    in_sample = fit_decision(split.labels, raw, params)
    assert not np.allclose(probabilities, in_sample.calibrate(raw))
    # Seeded: the same folds every time.
    again = cross_fitted(split, raw, params, seed=3)
    np.testing.assert_array_equal(again[0], probabilities)
    np.testing.assert_array_equal(again[1], thresholds)


@pytest.mark.parametrize("chosen", ["val", "external"])
def test_the_calibration_split_is_reported_out_of_fold_and_the_others_at_the_final_threshold(data, params, chosen):
    splits, scores = data
    report, reported = evaluate(scores, splits, replace(params, calibration_split=chosen), seed=3)
    final = fit_decision(splits[chosen].labels, scores[chosen], params)
    assert report["calibration_split"] == chosen
    assert report["threshold"] == pytest.approx(final.threshold, abs=1e-6)
    assert report["temperature"] == pytest.approx(final.temperature, abs=1e-4)
    assert report["calibration_bias"] == pytest.approx(final.bias, abs=1e-4)
    assert set(report["splits"]) == set(reported) == {"val", "test", "external"}
    for name, split in splits.items():
        entry = report["splits"][name]
        probabilities, thresholds = reported[name]
        assert entry["out_of_fold"] is (name == chosen), name
        assert entry["images"] == len(split) and entry["patients"] == 40
        if name == chosen:
            np.testing.assert_array_equal(reported[name][0], cross_fitted(split, scores[name], params, 3)[0])
            assert len(np.unique(thresholds)) == FOLDS
        else:
            np.testing.assert_allclose(probabilities, final.calibrate(scores[name]))
            assert (thresholds == final.threshold).all()
        for metric, values in entry["metrics"].items():
            # A percentile bootstrap CI need not hold the point value (ECE's is biased upwards).
            if values["value"] is not None:
                assert 0.0 <= values["ci_low"] <= values["ci_high"] <= 1.0, (name, metric)
                assert 0.0 <= values["value"] <= 1.0, (name, metric)
        assert 0.0 <= entry["metrics"]["roc_auc"]["value"] <= 1.0


def test_calibrating_on_an_external_set_that_is_not_there_is_a_params_error(data, params):
    splits, scores = data
    without = {name: split for name, split in splits.items() if name != "external"}
    with pytest.raises(ParamsError, match="calibration_split"):
        evaluate(scores, without, replace(params, calibration_split="external"), seed=3)
    report, _ = evaluate(scores, without, params, seed=3)  # validation is always there
    assert set(report["splits"]) == {"val", "test"}


def numbers(value) -> list[float]:
    if isinstance(value, dict):
        return [number for item in value.values() for number in numbers(item)]
    assert isinstance(value, (int, float)) or value is None, value
    return [value]


def test_headline_keeps_to_the_figures_that_decide(data, params):
    splits, scores = data
    params = replace(params, bootstrap_resamples=0)  # the headline holds no CI
    report, _ = evaluate(scores, splits, params, seed=3)
    figures = headline(report)
    assert len(numbers(figures)) <= 15, figures
    assert figures["threshold"] == report["threshold"]
    assert figures["external"]["roc_auc"] == report["splits"]["external"]["metrics"]["roc_auc"]["value"]
    assert set(figures) == {"threshold", "external", "test", "val"}
    # Without an external set, nothing is invented for it.
    kept = ("val", "test")
    partial, _ = evaluate({k: scores[k] for k in kept}, {k: splits[k] for k in kept}, params, seed=3)
    assert set(headline(partial)) == {"threshold", "test", "val"}
