"""The input gate: its score in the artefact is the one fitted, a refused file gets a clear error and no
label everywhere, and the outlier sets come from installed packages, offline and the same every time."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from pipeline import artefact, ood, outliers
from scoring.decision import Decision
from scoring.runtime import Predictor, ServingArtefact
from tests import image_factory as factory
from tests.helpers import EXAMPLES, KERAS_SAVE_WARNING, tiny_keras_model

pytestmark = pytest.mark.filterwarnings(KERAS_SAVE_WARNING)


@pytest.fixture(scope="module")
def model():
    import keras

    keras.utils.set_random_seed(5)
    return tiny_keras_model()


@pytest.fixture(scope="module")
def training_images() -> np.ndarray:
    rng = np.random.default_rng(0)
    base = factory.xray()
    return np.stack([np.clip(base.astype(int) + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)
                     for _ in range(24)])


def gate_for(model, images: np.ndarray) -> artefact.Gate:
    layers = ood.block_outputs(model, 2)
    labels = np.arange(len(images)) % 2
    pooled = ood.network_features(model, layers, images).pooled
    return artefact.Gate(tuple(ood.fit_layer(name, values, labels) for name, values in zip(layers, pooled)))


def test_layer_distance_is_small_for_the_training_distribution_and_large_off_it():
    rng = np.random.default_rng(1)
    inside = rng.normal(0, 1, (500, 8))
    gate = ood.fit_layer("x", inside, np.arange(500) % 2)
    assert gate.distance(rng.normal(0, 1, (200, 8))).mean() == pytest.approx(1.0, abs=0.25)
    assert gate.distance(rng.normal(4, 1, (200, 8))).mean() > 10


def test_the_artefacts_gate_score_is_the_fitted_one(model, training_images, tmp_path):
    # Through the file the ood stage writes and the assemble stage reads.
    gate_for(model, training_images).write(tmp_path / "gate.npz", {"ood": {"limit": 1e9}, "orientation_confidence": 0.8})
    gate, rule = artefact.Gate.read(tmp_path / "gate.npz")
    assert rule == {"ood": {"limit": 1e9}, "orientation_confidence": 0.8}
    decision = Decision(0.5, "youden", 64, ood={"score": "mahalanobis", "limit": 1e9})
    served = ServingArtefact(artefact.build(model, decision, gate))
    images = [training_images[0], factory.ramp(90, 64), np.full((64, 64), 200, np.uint8)]
    expected = gate.score(ood.network_features(model, [g.layer for g in gate.layers], images).pooled)
    np.testing.assert_allclose(served.scores(images).ood, expected, rtol=1e-3)  # float32 graph, float64 fit
    assert expected[0] < expected[1]  # the training distribution is nearer than a ramp


def test_a_gate_and_its_limit_go_together(model, training_images):
    with pytest.raises(artefact.ArtefactError, match="go together"):
        artefact.build(model, Decision(0.5, "youden", 64), gate_for(model, training_images))
    with pytest.raises(artefact.ArtefactError, match="go together"):
        artefact.build(model, Decision(0.5, "youden", 64, ood={"score": "m", "limit": 1.0}))


def test_refused_files_get_the_message_and_no_label(model, training_images):
    gate = gate_for(model, training_images)
    files = [("xray", factory.png(training_images[0])), ("example", EXAMPLES[0].read_bytes())]
    strict = Predictor(ServingArtefact(artefact.build(
        model, Decision(0.5, "youden", 64, ood={"score": "mahalanobis", "limit": -1.0}), gate)))
    for result in strict.predict(files):
        assert result.probability is None and result.label is None and result.triage is None
        assert result.error.startswith("not recognised as a frontal paediatric chest X-ray: not scored")
        assert "Send the frontal" in result.error  # what to do next
        # The raw score is kept for the JSON, not put in the sentence.
        assert result.ood_score > -1.0 and str(result.ood_score) not in result.error
    lenient = Predictor(ServingArtefact(artefact.build(
        model, Decision(0.5, "youden", 64, ood={"score": "mahalanobis", "limit": 1e9}), gate)))
    assert all(result.scored for result in lenient.predict(files))


def test_outlier_sets_are_built_offline_from_installed_packages(fixture_images):
    from scoring.imaging import decode_greyscale, read_bytes, resize_grey

    val = np.stack([resize_grey(decode_greyscale(read_bytes(path)), 64) for path in fixture_images[:8]])
    first, second = outliers.outlier_sets(7, val), ood.outlier_sets(7, val)
    assert [o.data for o in first] == [o.data for o in second]  # deterministic
    sources = Counter(outlier.source for outlier in first)
    for source in ("synthetic", "scikit-learn", "scikit-image", "matplotlib", "pydicom", "x-ray inverted"):
        assert sources[source] > 0, source
    # Turned X-rays are no outliers any more: serving puts them back upright.
    assert not any("rotated" in source for source in sources)
    assert {o.kind for o in first if o.source == "pydicom"} == {"near"}
    assert set(ood.TUNE_SOURCES) <= set(sources)  # tuned on some, reported on the others


def test_decode_for_gate_counts_what_never_reaches_the_model():
    files = [outliers.Outlier("text", "t", "far", b"not an image"),
             outliers.Outlier("flat", "t", "far", factory.png(np.full((64, 64), 9, np.uint8))),
             outliers.Outlier("xray", "t", "far", factory.png(factory.xray()))]
    reached, images, refused = outliers.decode_for_gate(files)
    assert [o.name for o in reached] == ["xray"] and len(images) == 1
    assert refused == {"undecodable": 1, "plausibility checks": 1}
