"""The evaluate stage's arithmetic, on synthetic scores (no training, no model): cross-fitting by patient,
which split is reported out of fold, and the headline `dvc metrics show` prints."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from pipeline.arrays import BACTERIAL, NO_SUBTYPE, VIRAL, Split
from pipeline.evaluate import cross_fitted, cross_fitted_viral, evaluate, fit_decision, headline
from pipeline.params import ParamsError
from scoring.runtime import Scores
from tests.helpers import project_params

FOLDS = 4


@pytest.fixture(scope="module")
def params():
    # Validation, so that a test without the external split still has its calibration split.
    return replace(project_params().evaluate, calibration_split="val", cross_fit_folds=FOLDS,
                   bootstrap_resamples=20)


def synthetic(seed: int, patients: int, name: str) -> tuple[Split, Scores]:
    """(a split of `patients` patients with 1 to 4 images each and one label each, half of the pneumonia
    patients viral; raw scores that separate the classes and the kinds imperfectly and sit too high, as an
    uncalibrated model's would)."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 5, patients)
    patient_labels = np.arange(patients) % 2
    patient_kinds = np.where(patient_labels == 1, np.where(np.arange(patients) % 4 == 1, VIRAL, BACTERIAL), NO_SUBTYPE)
    ids = np.repeat([f"{name}-p{index:03d}" for index in range(patients)], counts)
    labels = np.repeat(patient_labels, counts).astype(np.uint8)
    kinds = np.repeat(patient_kinds, counts).astype(np.int8)
    logits = 2.0 * labels - 0.3 + rng.normal(0.0, 1.2, len(labels))
    viral_logits = 2.0 * (kinds == VIRAL) - 1.5 + rng.normal(0.0, 1.0, len(labels))
    images = np.zeros((len(labels), 8, 8), dtype=np.uint8)
    scores = Scores(1.0 / (1.0 + np.exp(-logits)), None, None, 1.0 / (1.0 + np.exp(-viral_logits)),
                    np.zeros((len(labels), 8)))
    return Split(images, labels, ids, kinds), scores


@pytest.fixture(scope="module")
def data() -> tuple[dict[str, Split], dict[str, Scores]]:
    splits, scores = {}, {}
    for seed, name in enumerate(("val", "test", "external")):
        splits[name], scores[name] = synthetic(seed, 40, name)
    return splits, scores


def test_cross_fitting_is_out_of_fold_and_keeps_each_patient_in_one_fold(data, params):
    splits, scores = data
    split, raw = splits["val"], scores["val"].probability
    reported = cross_fitted(split, raw, params, seed=3)
    probabilities, thresholds = reported.probabilities, reported.thresholds
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
        # The triage band judging the fold was fitted there too, around that fold's threshold.
        assert (reported.normal_below[held_out] == fitted.normal_below).all()
        assert (reported.pneumonia_from[held_out] == fitted.pneumonia_from).all()
        assert fitted.normal_below <= fitted.threshold <= fitted.pneumonia_from
    assert patients_seen == set(split.patients.tolist())
    # Not the in-sample fit on every image (which would have seen the images it judges).
    in_sample = fit_decision(split.labels, raw, params)
    assert not np.allclose(probabilities, in_sample.calibrate(raw))
    # Seeded: the same folds every time.
    again = cross_fitted(split, raw, params, seed=3)
    np.testing.assert_array_equal(again.probabilities, probabilities)
    np.testing.assert_array_equal(again.thresholds, thresholds)


def test_viral_calibration_is_cross_fitted_on_the_known_kinds_only(data, params):
    splits, scores = data
    split, raw = splits["val"], scores["val"].viral
    calibrated = cross_fitted_viral(split, raw, params, seed=3)
    known = split.subtypes != NO_SUBTYPE
    # Normals have no kind: left as they are; the pneumonias are moved by a fit on other patients.
    np.testing.assert_array_equal(calibrated[~known], raw[~known])
    assert not np.allclose(calibrated[known], raw[known])
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(split.subtypes[known], calibrated[known]) > 0.7


@pytest.mark.parametrize("chosen", ["val", "external"])
def test_the_calibration_split_is_reported_out_of_fold_and_the_others_at_the_final_threshold(data, params, chosen):
    splits, scores = data
    report, reported = evaluate(scores, splits, replace(params, calibration_split=chosen), seed=3)
    final = fit_decision(splits[chosen].labels, scores[chosen].probability, params)
    assert report["calibration_split"] == chosen
    assert report["threshold"] == pytest.approx(final.threshold, abs=1e-6)
    assert report["temperature"] == pytest.approx(final.temperature, abs=1e-4)
    assert report["calibration_bias"] == pytest.approx(final.bias, abs=1e-4)
    assert set(report["splits"]) == set(reported) == {"val", "test", "external"}
    for name, split in splits.items():
        entry = report["splits"][name]
        probabilities, thresholds = reported[name].probabilities, reported[name].thresholds
        assert entry["out_of_fold"] is (name == chosen), name
        assert entry["images"] == len(split) and entry["patients"] == 40
        if name == chosen:
            expected = cross_fitted(split, scores[name].probability, params, 3).probabilities
            np.testing.assert_array_equal(probabilities, expected)
            assert len(np.unique(thresholds)) == FOLDS
            np.testing.assert_array_equal(reported[name].viral, cross_fitted_viral(split, scores[name].viral, params, 3))
        else:
            np.testing.assert_allclose(probabilities, final.calibrate(scores[name].probability))
            assert (thresholds == final.threshold).all()
            assert (reported[name].normal_below == final.normal_below).all()
        assert entry["subtype"]["images"] == int((split.subtypes != NO_SUBTYPE).sum())
        assert 0.0 <= entry["triage"]["review_share"] <= 1.0
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
    assert len(numbers(figures)) <= 20, figures
    assert figures["threshold"] == report["threshold"]
    assert figures["external"]["roc_auc"] == report["splits"]["external"]["metrics"]["roc_auc"]["value"]
    # Subtype and triage figures of the split that fitted them (out of fold there).
    assert set(figures) == {"threshold", "external", "test", "val", "subtype", "triage"}
    assert figures["triage"]["review_share"] == report["splits"]["val"]["triage"]["review_share"]
    assert report["triage"]["normal_below"] <= report["threshold"] <= report["triage"]["pneumonia_from"]
    # Without an external set, nothing is invented for it.
    kept = ("val", "test")
    partial, _ = evaluate({k: scores[k] for k in kept}, {k: splits[k] for k in kept}, params, seed=3)
    assert set(headline(partial)) == {"threshold", "test", "val", "subtype", "triage"}
