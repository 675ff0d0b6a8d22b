"""The real stages, through `dvc repro`, on the fixture archive, in temporary copies of the project.

Tiny images and one epoch keep each run to about a minute; what they check is the wiring: a registered
version with the production alias, sane metrics files, the serving artefact and its export, a no-op second
repro, experiments landing in the project's own MLflow store, the predict CLI on the registered model, a
local archive linked into data/sources/ in place of the configured URL, and an external set (the archive's
own test split) that calibration, the threshold and promotion are decided on.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.robustness import REPORTED
from scoring.decision import Decision
from scoring.runtime import ServingArtefact
from tests.helpers import (
    FIXTURE_DATASET,
    PROJECT,
    build_fixture_zip,
    create_project,
    registry_rows,
    run,
    update_params,
)

pytestmark = pytest.mark.slow

MODEL_NAME = "pneumonia-cnn"
FIXTURE_COUNT = len(list(FIXTURE_DATASET.rglob("*.jpeg")))  # 48


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, fixture_zip: Path) -> tuple[Path, dict[str, str]]:
    """A git + DVC project copy with tiny params, after one full `dvc repro` whose results (dvc.lock and
    the reports) are committed, as they are in the real project."""
    root = tmp_path_factory.mktemp("project")
    env = create_project(root, fixture_zip)
    run(["dvc", "repro"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "reproduced"], root, env)
    return root, env


@pytest.fixture(scope="module")
def external_project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """Like `project`, on an archive with its own test split (the external set), calibrated on it."""
    archive = build_fixture_zip(tmp_path_factory.mktemp("archive") / "with-test.zip", with_test_split=True)
    root = tmp_path_factory.mktemp("external-project")
    env = create_project(root, archive)
    update_params(root, evaluate={"calibration_split": "external"})
    run(["git", "commit", "-qam", "calibrate on the external set"], root, env)
    run(["dvc", "repro"], root, env)
    return root, env


def read(root: Path, path: str):
    return json.loads((root / path).read_text())


def test_repro_registers_a_version_with_the_production_alias(project):
    root, _ = project
    aliases = registry_rows(root, "select name, alias, version from registered_model_aliases")
    assert aliases == [(MODEL_NAME, "production", 1)]
    record = read(root, "models/registration.json")
    assert record["promoted"] is True and int(record["version"]) == 1
    assert record["split"] == "val"  # no external set: promotion is decided on validation, never on test
    tags = dict(registry_rows(root, "select key, value from model_version_tags where version = 1"))
    assert 0.0 <= float(tags["threshold"]) <= 1.0

    # The registered artefact, exported to models/registered, carries its name, version and figures.
    assert (root / "models/serving.onnx").stat().st_size > 1000
    assert sorted(p.name for p in (root / "models/registered").iterdir()) == ["MODEL_CARD.md", "model.onnx"]
    registered = ServingArtefact.from_file(root / "models/registered/model.onnx")
    decision = registered.decision
    assert (decision.model_name, decision.model_version) == (MODEL_NAME, "1")
    assert decision.threshold == pytest.approx(float(tags["threshold"]), abs=1e-6)
    assert decision.calibration["fitted_on"] == "val"
    assert 0.0 <= decision.metrics["test"]["roc_auc"]["value"] <= 1.0
    assert decision.images["test"] + decision.images["val"] < FIXTURE_COUNT
    card = (root / "models/registered/MODEL_CARD.md").read_text()
    assert f"{MODEL_NAME} version 1" in card and "Not a medical device" in card
    # The evaluated artefact and the registered one score alike: only the stamped version differs.
    evaluated = ServingArtefact.from_file(root / "models/serving.onnx")
    probes = np.random.default_rng(0).integers(0, 255, (3, 80, 80), dtype=np.uint8)
    np.testing.assert_array_equal(evaluated.probabilities(list(probes)), registered.probabilities(list(probes)))
    assert evaluated.decision.threshold == decision.threshold
    # Each stage fitted its part in its own file; the assemble stage put them together (and said what the
    # served artefact does with the outlier sets).
    fitted = Decision.from_json((root / "models/decision.json").read_text())
    assert fitted.threshold == decision.threshold and fitted.ood == {} and evaluated.decision.ood["limit"] > 0
    serving = read(root, "reports/serving.json")
    assert serving["bytes"] == (root / "models/serving.onnx").stat().st_size
    assert set(serving["served"]["diagnosed_rate"]) == {"far", "near"}


def test_metrics_files_hold_sane_values(project):
    root, _ = project
    evaluation = read(root, "reports/evaluation.json")
    assert evaluation["calibration_split"] == "val" and set(evaluation["splits"]) == {"val", "test"}
    assert evaluation["splits"]["val"]["out_of_fold"] is True
    assert evaluation["splits"]["test"]["out_of_fold"] is False
    for split in ("val", "test"):
        metrics = evaluation["splits"][split]["metrics"]
        for name in ("roc_auc", "pr_auc", "accuracy", "sensitivity", "specificity", "brier", "ece"):
            value = metrics[name]
            assert 0.0 <= value["ci_low"] <= value["ci_high"] <= 1.0, (split, name)
            assert 0.0 <= value["value"] <= 1.0, (split, name)
            if name != "ece":  # binned ECE is biased upwards under resampling: its CI may miss it
                assert value["ci_low"] <= value["value"] <= value["ci_high"], (split, name)
        # A one-epoch model may call no image positive: precision is then undefined, written as null.
        precision = metrics["precision"]["value"]
        assert precision is None or 0.0 <= precision <= 1.0
    assert 0.0 <= evaluation["threshold"] <= 1.0

    headline = read(root, "reports/metrics.json")
    assert headline["threshold"] == evaluation["threshold"]
    assert set(headline) == {"threshold", "test", "val", "subtype", "triage"}
    assert headline["test"]["roc_auc"] == evaluation["splits"]["test"]["metrics"]["roc_auc"]["value"]
    # Triage: a band around the threshold, with its figures on every split.
    assert evaluation["triage"]["normal_below"] <= evaluation["threshold"] <= evaluation["triage"]["pneumonia_from"]
    for split in ("val", "test"):
        assert 0.0 <= evaluation["splits"][split]["triage"]["review_share"] <= 1.0
        # The fixture's pneumonia files are named bacterial or viral: the subtype is measured on them.
        assert evaluation["splits"][split]["subtype"]["images"] > 0
    assert set(evaluation["subgroups"]["test"]) == {"normal_IM", "normal_NORMAL2", "bacterial", "viral"}

    summary = read(root, "reports/data_summary.json")
    assert set(summary["splits"]) == {"train", "val", "test"}
    assert sum(split["images"] for split in summary["splits"].values()) == FIXTURE_COUNT
    for figure in ("roc", "precision_recall", "calibration", "confusion_matrix"):
        assert (root / "reports/figures" / f"test_{figure}.png").stat().st_size > 1000
    assert (root / "dvc.lock").is_file()
    robustness = read(root, "reports/robustness.json")
    # Measured on validation (what recipes are compared on) and on the carved test split.
    assert set(robustness) == {"val", "test", "served"}
    for split in ("val", "test"):
        assert robustness[split]["shifts"] and set(robustness[split]["worst_change"]) == set(REPORTED)
    # Turned and mirrored copies through the serving path, against the upright images' own results.
    # (A one-epoch network has not learnt orientation: it may refuse them all as "which way up" unclear.)
    served = robustness["served"]
    assert served["split"] == "val" and 0.0 <= served["upright"]["scored"] <= 1.0
    assert served["upright"]["label_differs_from_upright"] in (0.0, None)
    assert {"upside down", "mirrored left-right", "noise sigma 12"} <= set(served)
    assert robustness["test"]["baseline"] != robustness["val"]["baseline"]


def test_second_repro_does_nothing(project):
    root, env = project
    result = run(["dvc", "repro"], root, env)
    assert "Running stage" not in result.stdout, result.stdout
    assert len(registry_rows(root, "select version from model_versions")) == 1


def test_predict_cli_scores_files_and_reports_unreadable_ones(project, fixture_images, tmp_path):
    root, env = project
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    files = [str(fixture_images[0]), str(fixture_images[-1]), str(broken)]
    output = tmp_path / "predictions.csv"
    # No --model-uri: the production alias in the project's own store.
    result = run([sys.executable, "-m", "pipeline.predict", *files, "--output", str(output)], root, env,
                 expected=1)  # 1: a file was unreadable
    rows = list(csv.DictReader(output.open()))
    assert [row["path"] for row in rows] == files
    assert list(rows[0])[:4] == ["path", "probability_pneumonia", "label", "error"]
    for row in rows[:2]:
        # Scored, or refused because a one-epoch network cannot tell which way up the X-ray is.
        if row["error"]:
            assert "which way up" in row["error"] and row["label"] == "" and row["triage"] == ""
        else:
            assert row["label"] in ("NORMAL", "PNEUMONIA") and 0.0 <= float(row["probability_pneumonia"]) <= 1.0
            assert row["triage"] in ("NORMAL", "PNEUMONIA", "REVIEW") and row["probability_viral"]
    assert rows[2]["error"] and rows[2]["label"] == "" and rows[2]["probability_pneumonia"] == ""
    assert "broken.png" in result.stderr
    assert f"{MODEL_NAME} version 1" in result.stderr
    # The exported copy of the registered model (models/registered) says exactly the same.
    exported = tmp_path / "exported.csv"
    run([sys.executable, "-m", "pipeline.predict", *files, "--model-uri", "models/registered",
         "--output", str(exported)], root, env, expected=1)
    assert list(csv.DictReader(exported.open())) == rows


def test_train_param_change_reruns_from_train_and_logs_into_the_project_store(project):
    root, env = project
    runs_before = len(registry_rows(root, "select run_uuid from runs"))
    result = run(["dvc", "exp", "run", "--temp", "-S", "train.dropout=0.2"], root, env)
    output = result.stdout + result.stderr
    # Only train and the stages after it rerun when only a train.* param changes.
    assert "Running stage 'train'" in output and "Running stage 'register'" in output, output
    assert "Running stage 'preprocess'" not in output and "Running stage 'download'" not in output, output
    # One new run (train; evaluate and register log into it), in the project's store, not the workspace's.
    assert len(registry_rows(root, "select run_uuid from runs")) == runs_before + 1
    assert len(registry_rows(root, "select version from model_versions")) == 2
    assert not list((root / ".dvc" / "tmp").rglob("mlflow.db"))


def test_local_archive_in_data_sources_replaces_the_configured_url(project, fixture_zip):
    """`make repro DATA=...`: the archive linked as data/sources/train is used instead of data.source,
    and nothing tracked by git changes but dvc.lock. (Reruns only the download stage here: the linked
    archive is the one the project was reproduced from, so everything downstream is unchanged.)"""
    root, env = project
    configured = yaml.safe_load((PROJECT / "params.yaml").read_text())["data"]
    assert configured["source"].startswith("https://")
    update_params(root, data={"source": configured["source"], "sha256": configured["sha256"]})
    run(["git", "commit", "-qam", "data.source back at the URL"], root, env)
    params_before = (root / "params.yaml").read_bytes()
    (root / "data/sources/train").symlink_to(fixture_zip)

    result = run(["dvc", "repro"], root, env)
    output = result.stdout + result.stderr
    assert "Running stage 'download'" in output, output
    assert f"Source: local {fixture_zip.name}" in output and "Source: http" not in output, output
    assert "Running stage 'train'" not in output, output  # the same images: nothing downstream reruns
    extracted = sorted(p.name for p in (root / "data/raw/archive").rglob("*.jpeg"))
    assert extracted == sorted(p.name for p in FIXTURE_DATASET.rglob("*.jpeg"))
    status = run(["git", "status", "--porcelain"], root, env).stdout.splitlines()
    assert status == [" M dvc.lock"], status
    assert (root / "params.yaml").read_bytes() == params_before
    assert run(["dvc", "status"], root, env).stdout.strip().endswith("up to date."), "dvc status"


def test_external_set_fits_calibration_and_decides_promotion(external_project):
    root, _ = external_project
    summary = read(root, "reports/data_summary.json")
    assert set(summary["splits"]) == {"train", "val", "test", "external"}
    assert sum(split["images"] for split in summary["splits"].values()) == FIXTURE_COUNT

    evaluation = read(root, "reports/evaluation.json")
    assert evaluation["calibration_split"] == "external"
    assert {name: split["out_of_fold"] for name, split in evaluation["splits"].items()} == {
        "external": True, "test": False, "val": False}
    assert evaluation["splits"]["external"]["images"] == summary["splits"]["external"]["images"]
    headline = read(root, "reports/metrics.json")
    assert set(headline) == {"threshold", "external", "test", "val", "subtype", "triage"}
    for figure in ("roc", "precision_recall", "calibration", "confusion_matrix"):
        assert (root / "reports/figures" / f"external_{figure}.png").stat().st_size > 1000
    robustness = read(root, "reports/robustness.json")
    assert set(robustness) == {"val", "test", "external", "served"} and robustness["served"]["split"] == "external"

    record = read(root, "models/registration.json")
    assert record["split"] == "external" and record["promoted"] is True
    decision = ServingArtefact.from_file(root / "models/registered/model.onnx").decision
    assert decision.calibration["fitted_on"] == "external"
    assert decision.threshold == pytest.approx(evaluation["threshold"], abs=1e-6)
    assert decision.images["external"] == summary["splits"]["external"]["images"]
    assert "figures out of fold" in (root / "models/registered/MODEL_CARD.md").read_text()
    assert registry_rows(root, "select alias, version from registered_model_aliases") == [("production", 1)]
