"""Scoring: the ONNX Runtime path agrees with Keras, falls back to TensorFlow, and bad files are reported."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.model import build_model
from pipeline.registry import ServingModel
from pipeline.serving import BATCH_SIZE, Predictor, Scorer


@pytest.fixture(scope="module")
def keras_model():
    model = build_model(input_size=64, image_size=32, filters=[4, 8], dropout=0.0)
    model(np.zeros((1, 64, 64, 1), dtype="float32"))
    return model


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (5, 80, 70), dtype=np.uint8)


def keras_scores(model, images):
    from pipeline.imaging import to_model_input

    batch = np.stack([to_model_input(image, 64) for image in images])
    return model(batch, training=False).numpy().reshape(-1)


def test_onnx_backend_matches_keras(keras_model, images):
    scorer = Scorer(keras_model)
    assert scorer.backend == "onnxruntime"
    np.testing.assert_allclose(scorer.probabilities(images), keras_scores(keras_model, images), atol=1e-5)


def test_failed_conversion_falls_back_to_tensorflow(keras_model, images, monkeypatch, caplog):
    import tf2onnx

    def broken(*args, **kwargs):
        raise RuntimeError("converter exploded")

    monkeypatch.setattr(tf2onnx.convert, "from_function", broken)
    scorer = Scorer(keras_model)
    assert scorer.backend == "tensorflow"
    assert "converter exploded" in caplog.text
    np.testing.assert_allclose(scorer.probabilities(images), keras_scores(keras_model, images), atol=1e-6)


def test_predict_paths_scores_readable_files_and_reports_the_rest(keras_model, fixture_images, tmp_path):
    broken = tmp_path / "broken.jpeg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really")
    paths = [*fixture_images[:3], broken, tmp_path / "missing.png", *fixture_images[3:BATCH_SIZE + 2]]
    predictor = Predictor(ServingModel(keras_model, threshold=0.5))
    predictions = predictor.predict_paths(paths)
    assert [p.path for p in predictions] == [str(path) for path in paths]  # order kept across batches
    failed = [p for p in predictions if p.error]
    assert [p.path for p in failed] == [str(broken), str(tmp_path / "missing.png")]
    scored = [p for p in predictions if not p.error]
    assert all(0.0 <= p.probability <= 1.0 for p in scored)
    assert all(p.label == ("PNEUMONIA" if p.probability >= 0.5 else "NORMAL") for p in scored)


def test_a_stored_onnx_model_is_used_only_if_it_agrees_with_keras(keras_model, images):
    from pipeline.serving import convert_to_onnx

    stored = convert_to_onnx(keras_model)
    np.testing.assert_allclose(Scorer(keras_model, stored).probabilities(images),
                               keras_scores(keras_model, images), atol=1e-5)
    other = build_model(input_size=64, image_size=32, filters=[4, 8], dropout=0.0)  # other random weights
    mismatched = Scorer(keras_model, convert_to_onnx(other))
    np.testing.assert_allclose(mismatched.probabilities(images), keras_scores(keras_model, images), atol=1e-5)
    corrupt = Scorer(keras_model, b"not an onnx model")
    np.testing.assert_allclose(corrupt.probabilities(images), keras_scores(keras_model, images), atol=1e-5)


def test_temperature_softens_probabilities_without_changing_their_order(keras_model, images):
    raw = Scorer(keras_model).probabilities(images)
    softened = Scorer(keras_model, temperature=3.0).probabilities(images)
    assert (np.abs(softened - 0.5) <= np.abs(raw - 0.5) + 1e-6).all()
    assert (np.argsort(raw) == np.argsort(softened)).all()
    with pytest.raises(ValueError, match="temperature"):
        Scorer(keras_model, temperature=0.0)


def test_calibration_bias_raises_every_logit_by_the_same_amount(keras_model, images):
    logit = lambda p: np.log(p / (1 - p))
    raw = Scorer(keras_model).probabilities(images)
    shifted = Scorer(keras_model, temperature=2.0, calibration_bias=1.0).probabilities(images)
    np.testing.assert_allclose(logit(shifted.astype(np.float64)), logit(raw.astype(np.float64)) / 2.0 + 1.0,
                               atol=1e-3)
