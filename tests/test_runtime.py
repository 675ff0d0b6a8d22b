"""The one prediction path (serving.runtime) and the MLflow pyfunc built on it: order, errors, checks,
threshold, batching; no TensorFlow needed."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from serving.decision import write
from serving.pyfunc import INPUT_COLUMN, OUTPUT_COLUMNS, predictions_frame
from serving.runtime import BATCH_SIZE, Predictor, ServingArtefact
from serving.store import ModelUnavailableError, artefact_path, load_artefact
from tests import image_factory as factory


@pytest.fixture(scope="module")
def predictor(tiny_bundle) -> Predictor:
    return Predictor(load_artefact(str(tiny_bundle)))


def test_predict_paths_keeps_order_across_batches_and_reports_unreadable_files(predictor, fixture_images, tmp_path):
    broken = tmp_path / "broken.jpeg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really")
    paths = [*fixture_images[:3], broken, tmp_path / "missing.png", *fixture_images[3:], *fixture_images]
    assert len(paths) > BATCH_SIZE  # crosses a batch boundary
    predictions = predictor.predict_paths(paths)
    assert [p.name for p in predictions] == [str(path) for path in paths]
    failed = [p for p in predictions if not p.scored]
    assert [p.name for p in failed] == [str(broken), str(tmp_path / "missing.png")]
    assert "corrupt or truncated" in failed[0].error and "no such file" in failed[1].error
    assert all(p.probability is None and p.label is None for p in failed)
    scored = [p for p in predictions if p.scored]
    assert all(0 <= p.probability <= 1 and p.label == predictor.decision.label(p.probability) for p in scored)
    # The same file scores the same wherever it sits in the batch.
    first, again = predictions[0], predictions[len(fixture_images) + 2]
    assert first.name == again.name and first.probability == again.probability


def with_threshold(bundle, threshold: float) -> Predictor:
    """The same network, its decision restamped with another threshold."""
    original = (bundle / "model.onnx").read_bytes()
    decision = ServingArtefact(original).decision
    return Predictor(ServingArtefact(write(original, replace(decision, threshold=threshold))))


def test_label_follows_the_registered_threshold(tiny_bundle):
    data = [("x", factory.xray_jpeg_bytes())]
    low, high = with_threshold(tiny_bundle, 0.0), with_threshold(tiny_bundle, 1.0)
    assert low.predict(data)[0].label == "PNEUMONIA" and low.predict(data)[0].threshold == 0.0
    assert high.predict(data)[0].label == "NORMAL"
    assert low.predict(data)[0].probability == high.predict(data)[0].probability


def test_plausibility_checks_refuse_the_same_files_for_everyone(predictor):
    colour = factory.encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), np.uint8)))
    cases = {
        "colour.png": (colour, "strongly coloured"),
        "strip.png": (factory.png(factory.ramp(900, 200)), "too elongated"),
        "flat.png": (factory.png(np.full((256, 256), 128, np.uint8)), "almost uniform"),
        "none": (None, "no image data"),
        "text": (b"hello", "not a recognised image"),
    }
    results = predictor.predict([(name, data) for name, (data, _) in cases.items()])
    for result, (name, (_, fragment)) in zip(results, cases.items()):
        assert not result.scored and fragment in result.error, (name, result.error)


def test_cam_and_decoded_image_come_back_only_when_asked(predictor):
    data = [("x", factory.xray_jpeg_bytes())]
    plain = predictor.predict(data)[0]
    assert plain.cam is None and plain.grey is None
    rich = predictor.predict(data, with_cam=True)[0]
    assert rich.grey.shape == factory.xray().shape and rich.cam.ndim == 2
    assert rich.probability == plain.probability


def test_size_cap_applies_per_file(predictor):
    data = factory.png(factory.xray())
    result = predictor.predict([("x", data)], max_bytes=len(data) - 1)[0]
    assert not result.scored and "limit" in result.error


def test_pyfunc_frame_has_a_row_per_image_and_nulls_not_nans(predictor):
    frame = pd.DataFrame({INPUT_COLUMN: [factory.xray_jpeg_bytes(), b"junk", None]})
    out = predictions_frame(predictor, frame)
    assert list(out.columns) == OUTPUT_COLUMNS and len(out) == 3
    assert out.loc[0, "label"] in ("NORMAL", "PNEUMONIA") and out.loc[0, "error"] is None
    assert out.loc[1, "probability"] is None and "not a recognised image" in out.loc[1, "error"]
    assert out.loc[2, "error"] == "no image data"
    assert (out["threshold"] == predictor.threshold).all()
    with pytest.raises(ValueError, match="column 'image'"):
        predictions_frame(predictor, pd.DataFrame({"pixels": [b""]}))


def test_model_uris_resolve_to_the_artefact(tiny_bundle, tmp_path):
    assert artefact_path(str(tiny_bundle)) == tiny_bundle / "model.onnx"
    assert artefact_path(str(tiny_bundle / "model.onnx")) == tiny_bundle / "model.onnx"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelUnavailableError, match="holds no model.onnx"):
        artefact_path(str(tmp_path / "empty"))
    with pytest.raises(ModelUnavailableError, match="neither a models:/ URI"):
        artefact_path(str(tmp_path / "nowhere"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.onnx").write_bytes(b"not onnx")
    with pytest.raises(ModelUnavailableError, match="missing or corrupt"):
        load_artefact(str(tmp_path / "bad"))
