"""`python -m pipeline.export`: from a model registered in a temporary MLflow store to a bundle folder
that `load_serving_model` reads back and that scores exactly like the registered model."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from pipeline.export import CARD_FILE, card_markdown, main
from pipeline.registry import (
    BUNDLE_FILE,
    BUNDLE_MODEL,
    BUNDLE_ONNX,
    CALIBRATION_BIAS_TAG,
    CARD_TAG,
    PRODUCTION_ALIAS,
    TEMPERATURE_TAG,
    THRESHOLD_TAG,
    load_serving_model,
)
from pipeline.serving import Scorer
from tests import image_factory as factory
from tests.test_app import KERAS_SAVE_WARNING

pytestmark = pytest.mark.filterwarnings(KERAS_SAVE_WARNING)

MODEL_NAME = "pneumonia-cnn"  # params.yaml's register.model_name, which production_uri() reads
THRESHOLD = 0.37
CARD = {
    "run_id": "filled-in", "trained_at": 1_700_000_000_000, "git_commit": "0123abc", "data_digest": "d1",
    "threshold": THRESHOLD, "threshold_rule": "youden", "test_images": 20,
    "test_metrics": {"roc_auc": {"value": 0.91, "ci_low": 0.85, "ci_high": 0.96},
                     "sensitivity": {"value": 0.9, "ci_low": 0.8, "ci_high": 0.97}},
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    """A temporary MLflow store holding one tiny model version with the `production` alias."""
    import mlflow

    from pipeline.model import build_model
    from pipeline.registry import ensure_experiment

    folder = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{(folder / 'mlflow.db').as_posix()}")
        experiment_id = ensure_experiment()
        model = build_model(64, 32, [4, 8], 0.0)
        with mlflow.start_run(experiment_id=experiment_id) as run:
            info = mlflow.tensorflow.log_model(model, name="model")
        card = {**CARD, "run_id": run.info.run_id}
        version = mlflow.register_model(info.model_uri, MODEL_NAME, tags={
            THRESHOLD_TAG: str(THRESHOLD), CARD_TAG: json.dumps(card), TEMPERATURE_TAG: "1.5",
            CALIBRATION_BIAS_TAG: "-0.25"})
        mlflow.MlflowClient().set_registered_model_alias(MODEL_NAME, PRODUCTION_ALIAS, version.version)
        yield {"version": version.version, "run_id": run.info.run_id}


@pytest.fixture(scope="module")
def probes() -> np.ndarray:
    """Real X-rays of different sizes, as uint8 greyscale, for comparing scores."""
    xray = factory.xray()
    return [xray, xray[:150, 30:200], np.ascontiguousarray(xray.T)]


def scores(serving, images) -> np.ndarray:
    return Scorer(serving.keras_model).probabilities(images)


def test_export_production_model(store, tmp_path, probes):
    dest = tmp_path / "exported"
    assert main([str(dest)]) == 0
    assert sorted(p.name for p in dest.iterdir()) == sorted([BUNDLE_FILE, BUNDLE_MODEL, BUNDLE_ONNX, CARD_FILE])
    assert not (tmp_path / "exported.partial").exists()

    bundle = json.loads((dest / BUNDLE_FILE).read_text())
    assert bundle["threshold"] == pytest.approx(THRESHOLD)
    assert bundle["input_size"] == 64
    assert bundle["exported_from"] == f"models:/{MODEL_NAME}@{PRODUCTION_ALIAS}"
    assert bundle["card"]["registered_name"] == MODEL_NAME
    assert bundle["card"]["version"] == store["version"]
    assert bundle["card"]["run_id"] == store["run_id"]
    assert bundle["card"]["test_metrics"] == CARD["test_metrics"]

    card_text = (dest / CARD_FILE).read_text()
    for fragment in (f"{MODEL_NAME} version {store['version']}", "0123abc", "2023-11-14", "0.3700",
                     "| ROC-AUC | 0.910 | 0.850 to 0.960 |", "CC BY 4.0", "Not a medical device"):
        assert fragment in card_text

    import keras

    keras.models.load_model(dest / BUNDLE_MODEL, compile=False, safe_mode=True)
    exported = load_serving_model(str(dest))
    # The stored ONNX twin is what serving runs, once it is checked against the Keras model.
    assert exported.onnx_model == (dest / BUNDLE_ONNX).read_bytes()
    assert Scorer(exported.keras_model, exported.onnx_model).backend == "onnxruntime"
    registered = load_serving_model(f"models:/{MODEL_NAME}/{store['version']}")
    assert exported.threshold == registered.threshold
    assert (exported.temperature, exported.calibration_bias) == (registered.temperature,
                                                                 registered.calibration_bias) == (1.5, -0.25)
    assert exported.card == registered.card
    np.testing.assert_allclose(scores(exported, probes), scores(registered, probes), rtol=0, atol=1e-6)


def test_export_a_version_and_re_export_a_bundle(store, tmp_path, probes):
    first, second = tmp_path / "v1", tmp_path / "copy"
    assert main([str(first), "--model-uri", f"models:/{MODEL_NAME}/{store['version']}"]) == 0
    assert main([str(second), "--model-uri", str(first)]) == 0
    assert json.loads((second / BUNDLE_FILE).read_text())["exported_from"] == str(first)
    np.testing.assert_allclose(scores(load_serving_model(str(second)), probes),
                               scores(load_serving_model(str(first)), probes), rtol=0, atol=1e-6)


def test_existing_destinations(store, tmp_path, caplog):
    dest = tmp_path / "bundle"
    assert main([str(dest)]) == 0
    before = (dest / BUNDLE_FILE).read_text()
    with caplog.at_level(logging.ERROR):
        assert main([str(dest)]) == 2
    assert "--force" in caplog.text and (dest / BUNDLE_FILE).read_text() == before
    assert main([str(dest), "--force"]) == 0

    other = tmp_path / "someone-elses-folder"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main([str(other), "--force"]) == 2
    assert "not an exported model" in caplog.text
    assert (other / "notes.txt").read_text() == "keep me"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 0 and (empty / BUNDLE_MODEL).is_file()


def test_no_model_exits_2_with_a_clear_message(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{(tmp_path / 'empty.db').as_posix()}")
    dest = tmp_path / "exported"
    with caplog.at_level(logging.ERROR):
        assert main([str(dest)]) == 2
    assert f"no model at models:/{MODEL_NAME}@{PRODUCTION_ALIAS}" in caplog.text
    assert "make repro" in caplog.text
    assert not dest.exists() and not Path(f"{dest}.partial").exists()

    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main([str(dest), "--model-uri", str(tmp_path / "missing-folder")]) == 2
    assert "missing-folder" in caplog.text


def test_card_markdown_with_a_sparse_card():
    text = card_markdown({}, 0.5)
    assert "unregistered model" in text and "unknown date" in text and "No test metrics" in text
    assert "Not a medical device" in text
    text = card_markdown({"test_metrics": {"pr_auc": {"value": None, "ci_low": None, "ci_high": None}}}, 0.5)
    assert "| PR-AUC | n/a | n/a to n/a |" in text
