"""The robustness check: each shift does what it says, and the report measures the fall against baseline."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.model import build_model
from pipeline.robustness import REPORTED, brightness, build_shifts, contrast, downscale, measure
from pipeline.serving import Scorer

PARAMS = {"brightness": [-40, 40], "contrast": [0.6], "gamma": [1.6], "blur_sigma": [1.5],
          "noise_sigma": [12], "downscale": [16], "equalize": True}


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    gradient = np.tile(np.linspace(20, 230, 64), (64, 1))
    return np.stack([np.clip(gradient + rng.normal(0, 5, (64, 64)), 0, 255) for _ in range(6)]).astype(np.uint8)


def test_every_shift_keeps_shape_and_dtype_and_changes_the_pixels(images):
    shifts = build_shifts(PARAMS)
    assert len(shifts) == 8
    for name, shift in shifts.items():
        shifted = shift(images, np.random.default_rng(0))
        assert shifted.shape == images.shape and shifted.dtype == np.uint8, name
        assert not np.array_equal(shifted, images), name


def test_shifts_move_the_statistics_they_claim_to(images):
    rng = np.random.default_rng(0)
    assert brightness(40)(images, rng).mean() > images.mean() + 30
    assert contrast(0.6)(images, rng).astype(float).std() < 0.7 * images.astype(float).std()
    detail = np.abs(np.diff(images.astype(float), axis=1)).mean()
    assert np.abs(np.diff(downscale(16)(images, rng).astype(float), axis=1)).mean() < detail


def test_measure_reports_baseline_and_change_per_shift(images):
    model = build_model(64, 32, [4, 8], 0.0)
    labels = np.array([0, 1, 0, 1, 0, 1])
    result = measure(Scorer(model), images, labels, 0.5, build_shifts(PARAMS), seed=0)
    assert set(result["baseline"]) == set(REPORTED)
    for metrics in result["shifts"].values():
        for key in REPORTED:
            assert metrics[f"{key}_change"] == pytest.approx(metrics[key] - result["baseline"][key], abs=1e-3)
    assert result["worst_change"]["roc_auc"] == min(m["roc_auc_change"] for m in result["shifts"].values())
