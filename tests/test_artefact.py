"""The serving artefact: one ONNX graph that agrees with Keras, with calibration folded in, a CAM that is
Grad-CAM, and the decision in its metadata."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from pipeline.artefact import ArtefactError, build
from pipeline.gradcam import GradCam
from pipeline.model import OUTPUT_NAME
from scoring.decision import (
    CAM_OUTPUT,
    METADATA_KEY,
    ORIENTATION_OUTPUT,
    PROBABILITY_OUTPUT,
    VIRAL_OUTPUT,
    Decision,
    DecisionError,
    read,
    write,
)
from scoring.imaging import decode_greyscale, read_bytes, resize_grey
from scoring.runtime import ArtefactLoadError, ServingArtefact
from tests.helpers import FIXTURE_DATASET, KERAS_SAVE_WARNING, tiny_keras_model

pytestmark = pytest.mark.filterwarnings(KERAS_SAVE_WARNING)

CALIBRATION = {"method": "platt", "temperature": 0.7, "bias": 1.5, "fitted_on": "external"}


def decision(**values) -> Decision:
    return Decision(**{"threshold": 0.6, "threshold_rule": "youden", "input_size": 64, **values})


@pytest.fixture(scope="module")
def model():
    import keras

    keras.utils.set_random_seed(11)  # a fixed network, so that its maps have evidence both ways
    trained_like = tiny_keras_model(dropout=0.3, orientation=None)
    # Random weights, but not the initial ones: a dense head with a clear sign makes the CAM informative.
    rng = np.random.default_rng(3)
    trained_like.set_weights([w + rng.normal(0, 0.2, w.shape).astype(w.dtype) for w in trained_like.get_weights()])
    # Channels voting both ways, so that maps have evidence towards each class.
    head = trained_like.get_layer(OUTPUT_NAME)
    kernel, bias = head.get_weights()
    head.set_weights([np.resize([1.0, -1.0], kernel.shape).astype(kernel.dtype), bias])
    return trained_like


@pytest.fixture(scope="module")
def fixture_batch() -> np.ndarray:
    paths = sorted(FIXTURE_DATASET.rglob("*.jpeg"))[::6]
    return np.stack([resize_grey(decode_greyscale(read_bytes(path)), 64) for path in paths])


def keras_logits(model, images: np.ndarray, head: str = "pneumonia") -> np.ndarray:
    """The head's logit as served: the mean of the image's and its mirror's."""
    batch = images.astype(np.float32)[..., np.newaxis]
    views = [model(view, training=False)[head].numpy().reshape(-1).astype(np.float64) for view in (batch, batch[:, :, ::-1])]
    return np.mean([np.log(p / (1 - p)) for p in views], axis=0)


def keras_probabilities(model, images: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-keras_logits(model, images)))


def test_probability_is_the_calibrated_keras_probability(model, fixture_batch):
    artefact = ServingArtefact(build(model, decision(calibration=CALIBRATION)))
    logit = keras_logits(model, fixture_batch)
    expected = 1 / (1 + np.exp(-(logit / CALIBRATION["temperature"] + CALIBRATION["bias"])))
    probabilities = artefact.run(fixture_batch).probability
    np.testing.assert_allclose(probabilities, expected, atol=2e-6)


def test_without_calibration_it_is_the_keras_model(model, fixture_batch):
    artefact = ServingArtefact(build(model, decision()))
    np.testing.assert_allclose(artefact.run(fixture_batch).probability, keras_probabilities(model, fixture_batch),
                               atol=2e-6)


def test_a_residual_network_serves_as_keras_scores_it(fixture_batch):
    residual = tiny_keras_model(orientation=None, residual=True)
    names = [layer.name for layer in residual.layers]
    # One addition per block; the width change of the first block goes through a projection.
    assert [name for name in names if name.endswith("_add")] == ["block1_add", "block2_add"]
    assert "block1_shortcut_conv" in names and "block2_shortcut_conv" in names
    artefact = ServingArtefact(build(residual, decision()))
    np.testing.assert_allclose(artefact.run(fixture_batch).probability, keras_probabilities(residual, fixture_batch),
                               atol=2e-6)


@pytest.mark.parametrize("towards_pneumonia", [True, False])
def test_cam_equals_tensorflow_grad_cam_up_to_normalisation(model, fixture_batch, towards_pneumonia):
    artefact = ServingArtefact(build(model, decision(calibration=CALIBRATION)))
    cams = artefact.run(fixture_batch, with_cam=True).cam
    evidence = np.maximum(cams * (1 if towards_pneumonia else -1), 0)
    peaks = evidence.max(axis=(1, 2), keepdims=True)
    ours = np.divide(evidence, peaks, out=np.zeros_like(evidence), where=peaks > 0)
    reference = GradCam(model).maps(fixture_batch, towards_pneumonia)
    assert ours.shape == reference.shape
    np.testing.assert_allclose(ours, reference, atol=1e-4)
    assert (peaks > 0).any()  # not vacuous: some maps have evidence


def test_cam_mean_plus_bias_is_the_calibrated_logit(model, fixture_batch):
    artefact = ServingArtefact(build(model, decision(calibration=CALIBRATION)))
    scores = artefact.run(fixture_batch, with_cam=True)
    probabilities, cams = scores.probability, scores.cam
    _, bias = model.get_layer(OUTPUT_NAME).get_weights()
    folded_bias = bias[0] / CALIBRATION["temperature"] + CALIBRATION["bias"]
    logits = cams.mean(axis=(1, 2)) + folded_bias
    np.testing.assert_allclose(1 / (1 + np.exp(-logits)), probabilities, atol=1e-5)


def test_decision_travels_in_the_metadata_and_outputs_are_named(model):
    wanted = decision(calibration=CALIBRATION, model_name="pneumonia-cnn", model_version="4", crop=0.9,
                      metrics={"external": {"roc_auc": {"value": 0.97, "ci_low": 0.95, "ci_high": 0.99}}})
    data = build(model, wanted)
    artefact = ServingArtefact(data)
    assert artefact.decision == wanted
    proto = onnx.load_from_string(data)
    assert {output.name for output in proto.graph.output} == {CAM_OUTPUT, PROBABILITY_OUTPUT, VIRAL_OUTPUT,
                                                              ORIENTATION_OUTPUT}
    assert [prop.key for prop in proto.metadata_props].count(METADATA_KEY) == 1


def test_the_diagnosis_is_the_same_for_an_image_and_its_mirror_and_orientation_tells_them_apart(model, fixture_batch):
    artefact = ServingArtefact(build(model, decision(calibration=CALIBRATION)))
    scores = artefact.run(fixture_batch, with_cam=True)
    mirrored = artefact.run(np.ascontiguousarray(fixture_batch[:, :, ::-1]), with_cam=True)
    np.testing.assert_allclose(mirrored.probability, scores.probability, atol=1e-6)
    np.testing.assert_allclose(mirrored.viral, scores.viral, atol=1e-6)
    np.testing.assert_allclose(mirrored.cam[:, :, ::-1], scores.cam, atol=1e-5)
    # The orientation head reads the image as given: its softmax, not an average with the mirror's.
    expected = model(fixture_batch.astype(np.float32)[..., np.newaxis], training=False)["orientation"].numpy()
    np.testing.assert_allclose(scores.orientation, expected, atol=1e-5)
    assert not np.allclose(mirrored.orientation, scores.orientation, atol=1e-4)


def test_viral_probability_is_the_calibrated_viral_head(model, fixture_batch):
    subtype = {"method": "platt", "temperature": 1.7, "bias": -0.4, "fitted_on": "external"}
    artefact = ServingArtefact(build(model, decision(subtype_calibration=subtype)))
    logit = keras_logits(model, fixture_batch, head="viral")
    expected = 1 / (1 + np.exp(-(logit / subtype["temperature"] + subtype["bias"])))
    np.testing.assert_allclose(artefact.run(fixture_batch).viral, expected, atol=2e-6)


def test_restamping_replaces_the_decision_and_keeps_the_graph(model, fixture_batch):
    data = build(model, decision())
    stamped = write(data, decision().registered("pneumonia-cnn", "12"))
    again = write(stamped, decision().registered("pneumonia-cnn", "13"))
    artefact = ServingArtefact(again)
    assert artefact.decision.model_version == "13"
    assert len([p for p in onnx.load_from_string(again).metadata_props if p.key == METADATA_KEY]) == 1
    np.testing.assert_array_equal(artefact.run(fixture_batch).probability,
                                  ServingArtefact(data).run(fixture_batch).probability)


def test_bad_decisions_and_bad_artefacts_are_refused(model):
    with pytest.raises(DecisionError, match="threshold"):
        decision(threshold=1.5)
    with pytest.raises(DecisionError, match="no decision metadata"):
        read({})
    with pytest.raises(DecisionError, match="format"):
        read({METADATA_KEY: '{"format": 99}'})
    with pytest.raises(ArtefactLoadError, match="not a readable ONNX model"):
        ServingArtefact(b"garbage", "broken.onnx")
    bare = onnx.load_from_string(build(model, decision()))
    del bare.metadata_props[:]
    with pytest.raises(ArtefactLoadError, match="no decision metadata"):
        ServingArtefact(bare.SerializeToString())


def test_a_model_without_global_pooling_is_refused():
    import keras

    inputs = keras.Input((64, 64, 1))
    outputs = keras.layers.Dense(1, activation="sigmoid")(keras.layers.Flatten()(inputs))
    with pytest.raises(ArtefactError, match="global_pool"):
        build(keras.Model(inputs, outputs), decision())


def test_crop_and_stem_models_convert_and_agree(fixture_batch):
    model = tiny_keras_model(crop=0.85, stem_filters=4, image_size=48)
    artefact = ServingArtefact(build(model, decision(crop=0.85)))
    scores = artefact.run(fixture_batch, with_cam=True)
    probabilities, cams = scores.probability, scores.cam
    np.testing.assert_allclose(probabilities, keras_probabilities(model, fixture_batch), atol=2e-6)
    assert cams.shape == (len(fixture_batch), 6, 6)  # 48 px, strided stem to 24, two pooling blocks
