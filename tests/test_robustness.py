"""The robustness check: each shift does what it says, and the report measures the fall against baseline."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.params import RobustnessParams
from pipeline.robustness import REPORTED, brightness, build_shifts, contrast, downscale, measure, zoom_in

PARAMS = RobustnessParams(brightness=[-40, 40], contrast=[0.6], gamma=[1.6], blur_sigma=[1.5], noise_sigma=[12],
                          downscale=[16], zoom_in=[1.4], equalize=True)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    gradient = np.tile(np.linspace(20, 230, 64), (64, 1))
    return np.stack([np.clip(gradient + rng.normal(0, 5, (64, 64)), 0, 255) for _ in range(6)]).astype(np.uint8)


def test_every_shift_keeps_shape_and_dtype_and_changes_the_pixels(images):
    shifts = build_shifts(PARAMS)
    assert list(shifts) == ["brightness -40", "brightness +40", "contrast x0.6", "gamma 1.6", "blur sigma 1.5",
                            "noise sigma 12", "resolution 16px", "zoomed in x1.4", "histogram equalised"]
    for name, shift in shifts.items():
        shifted = shift(images, np.random.default_rng(0))
        assert shifted.shape == images.shape and shifted.dtype == np.uint8, name
        assert not np.array_equal(shifted, images), name
    no_equalize = RobustnessParams(brightness=[], contrast=[], gamma=[], blur_sigma=[], noise_sigma=[], downscale=[],
                                   zoom_in=[], equalize=False)
    assert build_shifts(no_equalize) == {}


def test_shifts_move_the_statistics_they_claim_to(images):
    rng = np.random.default_rng(0)
    assert brightness(40)(images, rng).mean() > images.mean() + 30
    assert contrast(0.6)(images, rng).astype(float).std() < 0.7 * images.astype(float).std()
    detail = np.abs(np.diff(images.astype(float), axis=1)).mean()
    assert np.abs(np.diff(downscale(16)(images, rng).astype(float), axis=1)).mean() < detail


def test_zoom_in_keeps_the_centre_and_enlarges_it():
    square = np.zeros((1, 40, 40), dtype=np.uint8)
    square[0, 15:25, 15:25] = 200
    zoomed = zoom_in(2.0)(square, np.random.default_rng(0))[0]
    # The 10 px square becomes 20 px, still centred.
    bright = np.argwhere(zoomed > 100)
    assert 19 <= np.ptp(bright[:, 0]) + 1 <= 21 and 19 <= np.ptp(bright[:, 1]) + 1 <= 21
    assert abs(bright.mean() - 19.5) < 0.6
    np.testing.assert_array_equal(zoom_in(1.0)(square, np.random.default_rng(0)), square)
    with pytest.raises(ValueError, match="at least 1"):
        zoom_in(0.8)


class BrightnessModel:
    """Stands in for the serving artefact: an image's probability (and out-of-distribution score) is its
    mean brightness, thresholded at 0.6, refused by the gate above `limit`."""

    def __init__(self, limit: float | None) -> None:
        self.decision = SimpleNamespace(threshold=0.6, ood_limit=limit)

    def scores(self, images: np.ndarray) -> SimpleNamespace:
        mean = images.mean(axis=(1, 2))
        return SimpleNamespace(probability=mean / 255.0, ood=mean)


def test_measure_reports_each_shift_against_the_baseline_at_the_served_threshold():
    # Normals at 0.51-0.57, pneumonias at 0.67-0.73: all told apart at the threshold of 0.6, not at 0.5.
    images = np.stack([np.full((8, 8), value, dtype=np.uint8) for value in (130, 135, 140, 145, 170, 175, 180, 185)])
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    shifts = {"unchanged": lambda pixels, rng: pixels.copy(), "inverted": lambda pixels, rng: 255 - pixels,
              "brighter": brightness(40), "noise": _noisy}
    result = measure(BrightnessModel(limit=200.0), images, labels, shifts, seed=0)
    assert result["baseline"] | {"ece": 0} == {"roc_auc": 1.0, "accuracy": 1.0, "sensitivity": 1.0,
                                               "specificity": 1.0, "ece": 0, "refused_by_gate": 0.0}
    assert set(result["shifts"]["unchanged"].items()) >= {(f"{key}_change", 0.0) for key in REPORTED}
    # Inverted, every pneumonia falls below the threshold and the ranking turns over: the worst change.
    inverted = result["shifts"]["inverted"]
    assert (inverted["roc_auc_change"], inverted["sensitivity_change"]) == (-1.0, -1.0)
    assert result["worst_change"]["roc_auc"] == result["worst_change"]["sensitivity"] == -1.0
    # Calibration gets worse as ECE rises: the worst ECE change is the largest rise.
    assert inverted["ece_change"] > 0.1 and result["worst_change"]["ece"] == inverted["ece_change"]
    # Brighter, the gate refuses the pneumonias, yet the metrics still count every image.
    brighter = result["shifts"]["brighter"]
    assert brighter["refused_by_gate"] == 0.5 and brighter["sensitivity"] == 1.0
    # Without a gate nothing is reported as refused; seeded, the noise is the same every time.
    assert measure(BrightnessModel(limit=None), images, labels, shifts, seed=0)["baseline"]["refused_by_gate"] is None
    assert measure(BrightnessModel(limit=200.0), images, labels, shifts, seed=0) == result


def _noisy(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(pixels + rng.normal(0, 20, pixels.shape), 0, 255).astype(np.uint8)
