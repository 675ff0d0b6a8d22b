"""docs/tta_check.py, the diagnostic of test-time views in docs/experiments.md (round 9): its views of an
X-ray, and the served logit it ranks them against."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import docs_script, tiny_keras_model


@pytest.fixture(scope="module")
def tta():
    docs_script("recipe_search")  # its sibling import
    return docs_script("tta_check")


def test_zooming_out_shrinks_the_chest_into_the_centre_and_continues_the_edge(tta):
    images = np.zeros((2, 110, 110), dtype=np.uint8)
    images[:, 35:75, 35:75] = 200  # a 40 px bright square in the centre
    images[:, :, 0] = 90  # a left edge the padding must continue
    zoomed = tta.zoomed_out(images, 1.1)
    assert zoomed.shape == images.shape and zoomed.dtype == np.uint8
    bright = (zoomed[0] > 150).sum()
    assert abs(bright - 40 * 40 / 1.1**2) < 80  # the square's area shrinks by 1.21
    border = zoomed[0, 55, :5]  # (110 - 100) / 2 columns added on the left, each the shrunk image's edge
    assert (border == zoomed[0, 55, 5]).all() and border.min() > 60 and zoomed[0, 55, 8] < 60
    assert tta.zoomed_out(np.full((1, 64, 64), 77, dtype=np.uint8), 1.1).min() == 77


def test_shifting_moves_the_image_by_whole_pixels(tta):
    images = np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8)
    moved = tta.shifted(images, 2, -1)
    assert moved[1, 2, 0] == images[1, 0, 1] and moved.shape == images.shape


def test_the_served_logit_averages_the_image_and_its_mirror(tta):
    model = tiny_keras_model()
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (4, 64, 64), dtype=np.uint8)
    served = tta.logits(model, images)
    upright, mirror = tta.logits(model, images, mirrored=False), tta.logits(model, images[:, :, ::-1], mirrored=False)
    np.testing.assert_allclose(served, (upright + mirror) / 2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tta.logits(model, images[:, :, ::-1]), served, rtol=1e-5, atol=1e-5)
    assert not np.allclose(upright, mirror, atol=1e-4)  # the views differ, so the average is not a no-op
    probability = model.predict(images.astype(np.float32)[..., np.newaxis], verbose=0)["pneumonia"].reshape(-1)
    np.testing.assert_allclose(upright, np.log(probability / (1 - probability)), rtol=1e-4, atol=1e-4)
