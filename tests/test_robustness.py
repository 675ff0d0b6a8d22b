"""The robustness check: each shift does what it says, and the report measures the fall against baseline."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.artefact import build
from pipeline.metrics import point_metrics
from pipeline.params import RobustnessParams
from pipeline.robustness import REPORTED, brightness, build_shifts, contrast, downscale, measure
from serving.decision import Decision
from serving.runtime import ServingArtefact
from tests.helpers import tiny_keras_model

PARAMS = RobustnessParams(brightness=[-40, 40], contrast=[0.6], gamma=[1.6], blur_sigma=[1.5], noise_sigma=[12],
                          downscale=[16], equalize=True)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    gradient = np.tile(np.linspace(20, 230, 64), (64, 1))
    return np.stack([np.clip(gradient + rng.normal(0, 5, (64, 64)), 0, 255) for _ in range(6)]).astype(np.uint8)


@pytest.fixture(scope="module")
def artefact() -> ServingArtefact:
    """The serving artefact of an untrained tiny CNN (64 px input), labelling at 0.5."""
    decision = Decision(threshold=0.5, threshold_rule="youden", input_size=64)
    return ServingArtefact(build(tiny_keras_model(64), decision), "tiny")


def test_every_shift_keeps_shape_and_dtype_and_changes_the_pixels(images):
    shifts = build_shifts(PARAMS)
    assert list(shifts) == ["brightness -40", "brightness +40", "contrast x0.6", "gamma 1.6", "blur sigma 1.5",
                            "noise sigma 12", "resolution 16px", "histogram equalised"]
    for name, shift in shifts.items():
        shifted = shift(images, np.random.default_rng(0))
        assert shifted.shape == images.shape and shifted.dtype == np.uint8, name
        assert not np.array_equal(shifted, images), name
    no_equalize = RobustnessParams(brightness=[], contrast=[], gamma=[], blur_sigma=[], noise_sigma=[], downscale=[],
                                   equalize=False)
    assert build_shifts(no_equalize) == {}


def test_shifts_move_the_statistics_they_claim_to(images):
    rng = np.random.default_rng(0)
    assert brightness(40)(images, rng).mean() > images.mean() + 30
    assert contrast(0.6)(images, rng).astype(float).std() < 0.7 * images.astype(float).std()
    detail = np.abs(np.diff(images.astype(float), axis=1)).mean()
    assert np.abs(np.diff(downscale(16)(images, rng).astype(float), axis=1)).mean() < detail


def test_measure_reports_baseline_and_change_per_shift(images, artefact):
    labels = np.array([0, 1, 0, 1, 0, 1])
    shifts = build_shifts(PARAMS)
    result = measure(artefact, images, labels, shifts, seed=0)
    assert set(result["baseline"]) - {"refused_by_gate"} == set(REPORTED)
    # This artefact has no input gate: nothing is reported as refused by one.
    assert result["baseline"].get("refused_by_gate") is None
    # The baseline is the served artefact's own scores at its own threshold.
    expected = point_metrics(labels, artefact.probabilities(images), artefact.decision.threshold)
    for key in REPORTED:
        assert result["baseline"][key] == pytest.approx(expected[key], abs=1e-4), key
    assert set(result["shifts"]) == set(shifts)
    for metrics in result["shifts"].values():
        for key in REPORTED:
            assert metrics[f"{key}_change"] == pytest.approx(metrics[key] - result["baseline"][key], abs=1e-3)
    for key in ("roc_auc", "accuracy", "sensitivity", "specificity"):
        assert result["worst_change"][key] == min(m[f"{key}_change"] for m in result["shifts"].values())
    # Calibration gets worse as ECE rises: its worst change is the largest.
    assert result["worst_change"]["ece"] == max(m["ece_change"] for m in result["shifts"].values())
    # Seeded: the noise shift draws the same noise every time.
    assert measure(artefact, images, labels, shifts, seed=0) == result
