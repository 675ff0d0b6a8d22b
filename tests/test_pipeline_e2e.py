"""The real stages, through `dvc repro`, on the fixture archive, in a temporary copy of the project.

Tiny images and one epoch keep it to about a minute; what it checks is the wiring: a registered version
with the production alias, sane metrics files, a no-op second repro, experiments landing in the
project's own MLflow store, and the predict CLI on the registered model.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

from tests.pipeline_project import create_project, registry_rows, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, fixture_zip: Path) -> tuple[Path, dict[str, str]]:
    """A git + DVC project copy with tiny params, after one full `dvc repro`."""
    root = tmp_path_factory.mktemp("project")
    env = create_project(root, fixture_zip)
    run(["dvc", "repro"], root, env)
    return root, env


def test_repro_registers_a_version_with_the_production_alias(project):
    root, _ = project
    aliases = registry_rows(root, "select name, alias, version from registered_model_aliases")
    assert aliases == [("pneumonia-cnn", "production", 1)]
    decision = json.loads((root / "reports/registry.json").read_text())
    assert decision["promoted"] is True and int(decision["version"]) == 1
    tags = dict(registry_rows(root, "select key, value from model_version_tags where version = 1"))
    assert 0.0 <= float(tags["decision_threshold"]) <= 1.0
    assert json.loads(tags["model_card"])["test_metrics"]["roc_auc"]["value"] >= 0.0


def test_metrics_files_hold_sane_values(project):
    root, _ = project
    metrics = json.loads((root / "reports/metrics.json").read_text())
    for name in ("roc_auc", "pr_auc", "accuracy", "sensitivity", "specificity", "brier", "ece"):
        value = metrics["test"][name]
        assert 0.0 <= value["ci_low"] <= value["value"] <= value["ci_high"] <= 1.0, name
    # A one-epoch model may call no image positive: precision is then undefined, written as null.
    precision = metrics["test"]["precision"]["value"]
    assert precision is None or 0.0 <= precision <= 1.0
    assert 0.0 <= metrics["threshold"] <= 1.0
    summary = json.loads((root / "reports/data_summary.json").read_text())
    assert sum(split["images"] for split in summary["splits"].values()) == 48
    for figure in ("roc.png", "precision_recall.png", "calibration.png", "confusion_matrix.png"):
        assert (root / "reports/figures" / figure).stat().st_size > 1000
    assert (root / "dvc.lock").is_file()
    robustness = json.loads((root / "reports/robustness.json").read_text())
    # Reported on test; measured on validation too, which is what recipes are compared on.
    for split in (robustness, robustness["val"]):
        assert split["shifts"] and set(split["worst_change"]) == {"roc_auc", "accuracy", "sensitivity",
                                                                  "specificity", "ece"}
    assert robustness["baseline"] != robustness["val"]["baseline"]


def test_second_repro_does_nothing(project):
    root, env = project
    result = run(["dvc", "repro"], root, env)
    assert "Running stage" not in result.stdout, result.stdout
    assert len(registry_rows(root, "select version from model_versions")) == 1


def test_predict_cli_scores_files_and_reports_unreadable_ones(project, fixture_images, tmp_path):
    root, env = project
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    output = tmp_path / "predictions.csv"
    result = run([sys.executable, "-m", "pipeline.predict", str(fixture_images[0]), str(fixture_images[-1]),
                  str(broken), "--output", str(output)], root, env, expected=1)  # 1: a file was unreadable
    rows = list(csv.DictReader(output.open()))
    assert [row["label"] for row in rows[:2]] != ["", ""] and rows[2]["error"]
    assert all(0.0 <= float(row["probability_pneumonia"]) <= 1.0 for row in rows[:2])
    assert "broken.png" in result.stderr


def test_train_param_change_reruns_from_train_and_logs_into_the_project_store(project):
    root, env = project
    runs_before = len(registry_rows(root, "select run_uuid from runs"))
    result = run(["dvc", "exp", "run", "--temp", "-S", "train.dropout=0.2"], root, env)
    output = result.stdout + result.stderr
    # Only train and the stages after it rerun when only a train.* param changes.
    assert "Running stage 'train'" in output and "Running stage 'register'" in output, output
    assert "Running stage 'preprocess'" not in output and "Running stage 'download'" not in output, output
    assert len(registry_rows(root, "select run_uuid from runs")) == runs_before + 1
    assert not list((root / ".dvc" / "tmp").rglob("mlflow.db"))
