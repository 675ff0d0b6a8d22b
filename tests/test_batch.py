"""Batch scoring on Spark (`python -m pipeline.batch`).

The Spark tests run Spark in local mode on a registered model: the project's pyfunc around a tiny
untrained artefact, registered with its `production` alias in a throwaway SQLite store. Spark must say what
the predict path (`scoring.runtime.Predictor`) says for every file, turn bad files into error rows, and
never fail the job for them.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import EXAMPLES, FIXTURE_DATASET, PROJECT, project_env, run

MODEL_NAME = "pneumonia-cnn"
COLUMNS = ["path", "probability_pneumonia", "label", "error", "triage", "subtype", "probability_viral", "note",
           "ood_score", "threshold", "model_name", "model_version"]

REGISTER = """
import mlflow
from pipeline.register import log_serving_model
from scoring.locations import configure_tracking, production_uri
configure_tracking()
experiment = mlflow.create_experiment("batch-tests", artifact_location={artifacts!r})
with mlflow.start_run(experiment_id=experiment) as active:
    pass
version = mlflow.register_model(log_serving_model(active.info.run_id, {artefact!r}), {name!r})
mlflow.MlflowClient().set_registered_model_alias({name!r}, "production", version.version)
"""


def java_missing() -> str | None:
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        return "Spark 4 needs Java 17+ (Debian: apt-get install openjdk-17-jre-headless; .ci/run installs it)"
    return None


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path) -> dict[str, str]:
    """The environment of a throwaway MLflow store holding the tiny model as production version 1."""
    pytest.importorskip("pyspark", reason="the `spark` extra is not installed (make setup-scale)")
    scratch = tmp_path_factory.mktemp("batch-store")
    # log_serving_model names the pyfunc's code and example relative to a checkout: a clean one (no
    # git-ignored files, which would be logged with the code).
    checkout = scratch / "checkout"
    shutil.copytree(PROJECT / "scoring", checkout / "scoring",
                    ignore=shutil.ignore_patterns("__pycache__", "node_modules", "vendor"))
    shutil.copytree(PROJECT / "examples", checkout / "examples")
    env = project_env(MLFLOW_TRACKING_URI=f"sqlite:///{scratch / 'mlflow.db'}",
                      PYTHONPATH=os.pathsep.join([str(PROJECT), os.environ.get("PYTHONPATH", "")]))
    script = REGISTER.format(artifacts=(scratch / "mlruns").as_uri(), artefact=str(tiny_bundle / "model.onnx"),
                             name=MODEL_NAME)
    run([sys.executable, "-c", script], checkout, env)
    return env


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A folder tree of chest X-rays and bad files; {file name: what must happen to it}."""
    folder = tmp_path_factory.mktemp("batch-input")
    (folder / "a" / "b").mkdir(parents=True)
    expected = {}
    fixtures = sorted(FIXTURE_DATASET.rglob("*.jpeg"))
    for index, path in enumerate(fixtures[:12]):
        shutil.copy2(path, folder / ("a/b" if index % 2 else "a") / path.name)
        expected[path.name] = "scored"
    shutil.copy2(EXAMPLES[0], folder / EXAMPLES[0].name)
    expected[EXAMPLES[0].name] = "scored"
    (folder / "a" / "truncated.jpeg").write_bytes(fixtures[0].read_bytes()[:300])
    (folder / "text.png").write_bytes(b"not an image at all\n" * 20)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "no-extension").write_bytes(b"\x00" * 200)  # might be a DICOM by name: scored, refused
    with (folder / "huge.png").open("wb") as handle:  # over the 50 MB limit (sparse: costs no disk)
        handle.truncate(51 * 1024 * 1024)
    expected.update({"truncated.jpeg": "error", "text.png": "error", "empty.jpg": "error",
                     "no-extension": "error", "huge.png": "error"})
    (folder / "notes.txt").write_text("not an image by name: skipped\n")
    (folder / ".hidden.png").write_bytes(b"hidden: skipped")
    return folder, expected


def batch(args: list[str], env: dict[str, str], expected: int) -> str:
    result = run([sys.executable, "-m", "pipeline.batch", *args], PROJECT, env, expected=expected, timeout=300)
    assert "Traceback" not in result.stderr, result.stderr
    return result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.skipif(java_missing() is not None, reason=str(java_missing()))
def test_spark_scores_a_folder_as_the_predict_path_does_and_bad_files_become_error_rows(
        registered, images, tmp_path: Path):
    folder, expected = images
    out = tmp_path / "scores.parquet"
    text = batch([str(folder), "--output", str(out), "--master", "local[2]"], registered, expected=1)
    assert f"scored {sum(v == 'scored' for v in expected.values())} of {len(expected)} files" in text
    assert f"with {MODEL_NAME} version 1" in text

    table = pd.read_parquet(out)
    assert list(table.columns) == COLUMNS
    table["name"] = table["path"].map(lambda p: Path(p).name)
    assert sorted(table["name"]) == sorted(expected), "skipped or missing files"
    assert set(table["model_version"]) == {"1"} and set(table["model_name"]) == {MODEL_NAME}
    for row in table.itertuples():
        if expected[row.name] == "scored":
            assert pd.isna(row.error) and row.label in ("NORMAL", "PNEUMONIA") and 0 <= row.probability_pneumonia <= 1
            assert row.triage in ("NORMAL", "PNEUMONIA", "REVIEW") and 0 <= row.probability_viral <= 1
        else:  # (pandas 3 reads a missing string as NaN)
            assert row.error and pd.isna(row.label) and pd.isna(row.probability_pneumonia), row
            assert pd.isna(row.triage) and pd.isna(row.probability_viral), row
    assert "50 MB" in table.set_index("name").loc["huge.png", "error"]

    # The same files through the predict path itself: the same probabilities, labels and refusals.
    from scoring.runtime import Predictor
    from scoring.store import load_artefact

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", registered["MLFLOW_TRACKING_URI"])
        predictor = Predictor(load_artefact(f"models:/{MODEL_NAME}@production"))
    reference = {Path(p.name).name: p for p in predictor.predict_paths(
        [folder / n for n in table["path"].map(lambda p: p.removeprefix("file:"))])}
    # A file Spark never reads because of its size is worded as the predict path words it (scoring.wording).
    assert table.set_index("name").loc["huge.png", "error"] == reference["huge.png"].error
    for row in table.itertuples():
        if row.name == "huge.png":
            continue
        want = reference[row.name]
        for field, value in want.record().items():
            got = getattr(row, field)
            if field == "error":  # files Spark never reads (empty ones) have the batch's own sentence
                assert pd.isna(got) == (value is None), (row.name, got, value)
            elif isinstance(value, float):
                assert abs(got - value) < 1e-6, (row.name, field)
            else:
                assert (None if pd.isna(got) else got) == value, (row.name, field)


@pytest.mark.slow
@pytest.mark.skipif(java_missing() is not None, reason=str(java_missing()))
def test_spark_scores_a_parquet_table_of_image_bytes(registered, tmp_path: Path):
    table = pd.DataFrame({"path": ["x1", "x2", "missing", "junk"],
                          "image": [EXAMPLES[0].read_bytes(), EXAMPLES[-1].read_bytes(), None, b"junk"]})
    source = tmp_path / "images.parquet"
    table.to_parquet(source)
    out = tmp_path / "scores"
    text = batch([str(source), "--output", str(out), "--master", "local[1]",
                  "--model-uri", f"models:/{MODEL_NAME}/1"], registered, expected=1)
    assert "scored 2 of 4 files" in text
    scored = pd.read_parquet(out).set_index("path").sort_index()
    assert list(scored.index) == ["junk", "missing", "x1", "x2"]
    assert scored.loc[["x1", "x2"], "error"].isna().all()
    assert scored.loc[["junk", "missing"], "label"].isna().all() and scored.loc[["junk", "missing"], "error"].all()


@pytest.mark.slow  # a subprocess importing MLflow: seconds the fast suite cannot spare
def test_no_model_is_one_line_and_exit_2_before_spark_starts(tmp_path: Path):
    env = project_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'empty.db'}")
    result = run([sys.executable, "-m", "pipeline.batch", str(EXAMPLES[0]), "--output", str(tmp_path / "out")],
                 PROJECT, env, expected=2, timeout=120)
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "no model at models:/pneumonia-cnn@production" in errors[0], result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()

