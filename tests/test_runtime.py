"""The one prediction path (scoring.runtime) and the MLflow pyfunc built on it: order, errors, checks,
threshold, batching; no TensorFlow needed."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from scoring.decision import write
from scoring.pyfunc import INPUT_COLUMN, OUTPUT_COLUMNS, predictions_frame
from scoring.runtime import BATCH_SIZE, Predictor, ServingArtefact
from scoring.store import ModelUnavailableError, artefact_path, load_artefact
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


def test_a_batch_is_run_in_slices_with_every_output_in_order(predictor):
    from scoring.runtime import RUN_SIZE

    artefact = predictor.artefact
    images = np.random.default_rng(3).integers(0, 255, (2 * RUN_SIZE + 1, 64, 64), dtype=np.uint8)
    together = artefact.run(images, with_cam=True)
    alone = [artefact.run(image[np.newaxis], with_cam=True) for image in images]
    for field in ("probability", "viral", "orientation", "cam"):
        np.testing.assert_allclose(getattr(together, field), np.concatenate([getattr(one, field) for one in alone]),
                                   rtol=1e-5, atol=1e-6)


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
    assert out.loc[0, "triage"] in ("NORMAL", "PNEUMONIA", "REVIEW") and 0 <= out.loc[0, "probability_viral"] <= 1
    assert out.loc[1, "probability_pneumonia"] is None and "not a recognised image" in out.loc[1, "error"]
    assert out.loc[1, "triage"] is None and out.loc[1, "probability_viral"] is None
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


@pytest.fixture(scope="module")
def network():
    """One tiny network whose orientation head can be set to any answer (the trunk stays the same)."""
    import keras

    from tests.helpers import tiny_keras_model

    keras.utils.set_random_seed(5)
    return tiny_keras_model(orientation=None)


def predictor_sure_of(network, orientation: int | None, **decision) -> Predictor:
    """A predictor on `network` whose orientation head says `orientation` of every image (None: unsure)."""
    from pipeline.artefact import build
    from pipeline.model import ORIENTATION_OUTPUT_NAME
    from scoring.decision import Decision

    head = network.get_layer(ORIENTATION_OUTPUT_NAME)
    kernel, bias = head.get_weights()
    answer = np.zeros_like(bias) if orientation is None else np.where(np.arange(len(bias)) == orientation, 12.0, 0.0)
    head.set_weights([np.zeros_like(kernel), answer.astype(bias.dtype)])
    return Predictor(ServingArtefact(build(network, Decision(**{"threshold": 0.5, "threshold_rule": "youden",
                                                                 "input_size": 64, **decision}))))


@pytest.mark.parametrize("orientation", [1, 2, 3, 4, 6])
def test_a_turned_or_mirrored_xray_is_put_back_upright_scored_and_said_so(network, orientation):
    from scoring.orientation import ORIENTATIONS
    from scoring.orientation import orient as put

    upright_grey = factory.xray()
    turned = factory.png(put(upright_grey, orientation))
    sure = predictor_sure_of(network, orientation).predict([("x", turned)], with_cam=True)[0]
    plain = predictor_sure_of(network, 0).predict([("x", factory.png(upright_grey))], with_cam=True)[0]
    assert sure.scored and sure.error is None
    assert sure.probability == pytest.approx(plain.probability, abs=1e-6)
    assert ORIENTATIONS[orientation] in sure.note and "upright before scoring" in sure.note
    np.testing.assert_array_equal(sure.grey, upright_grey)  # the map is drawn on what was scored
    assert plain.note is None


def test_an_xray_whose_orientation_is_unclear_is_refused_with_what_to_do(network):
    result = predictor_sure_of(network, None).predict([("x", factory.xray_jpeg_bytes())])[0]
    assert not result.scored and "which way up" in result.error and "head at the top" in result.error
    assert result.triage is None and result.subtype is None and result.probability_viral is None


def test_triage_and_subtype_follow_the_decision(network):
    data = [("x", factory.xray_jpeg_bytes())]
    probability = predictor_sure_of(network, 0).predict(data)[0].probability
    below = predictor_sure_of(network, 0, threshold=0.0, triage={"normal_below": 0.0, "pneumonia_from": 1.0})
    result = below.predict(data)[0]
    # Labelled PNEUMONIA at threshold 0, but inside the band: a reader looks at it.
    assert result.label == "PNEUMONIA" and result.triage == "REVIEW"
    assert result.subtype in ("BACTERIAL", "VIRAL")
    decided = predictor_sure_of(network, 0, threshold=0.0, subtype_threshold=0.0,
                                triage={"normal_below": 0.0, "pneumonia_from": 0.0}).predict(data)[0]
    assert decided.triage == "PNEUMONIA" and decided.subtype == "VIRAL"
    normal = predictor_sure_of(network, 0, threshold=1.0, triage={"normal_below": 1.0, "pneumonia_from": 1.0})
    result = normal.predict(data)[0]
    assert result.label == "NORMAL" and result.triage == "NORMAL" and result.subtype is None
    assert result.probability == pytest.approx(probability) and result.probability_viral is not None
