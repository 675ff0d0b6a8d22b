"""The project's default DVC remote: `dvc push` from one clone, `dvc pull` in a fresh one, and the trained
model is served there without retraining and without the MLflow store it was registered in.

The temporary project gets the project's own `.dvc/config`, so the remote under test is the configured
default (a folder beside the project, shared by clones side by side).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from serving import results as app_results
from tests.helpers import EXAMPLES, PROJECT, create_project, run

pytestmark = pytest.mark.slow


def default_remote_url() -> str:
    from configobj import ConfigObj  # what DVC reads its config with

    config = ConfigObj(str(PROJECT / ".dvc" / "config"))
    return config[f'remote "{config["core"]["remote"]}"']["url"]


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory, fixture_zip: Path) -> tuple[Path, dict[str, str]]:
    """A reproduced project, committed and pushed to its default remote."""
    origin = tmp_path_factory.mktemp("team") / "origin"
    env = create_project(origin, fixture_zip)
    # A clean checkout, as a teammate's clone is: no git-ignored files (node_modules, caches) that a clone
    # would lack and that DVC, hashing the `serving` folder the register stage depends on, would see.
    run(["git", "clean", "-fdXq"], origin, env)
    shutil.copy2(PROJECT / ".dvc" / "config", origin / ".dvc" / "config")
    run(["git", "commit", "-qam", "default remote"], origin, env)
    run(["dvc", "repro"], origin, env)
    run(["git", "add", "-A"], origin, env)
    run(["git", "commit", "-qm", "reproduced"], origin, env)
    run(["dvc", "push"], origin, env)
    return origin, env


def test_the_default_remote_is_a_folder_beside_the_project():
    url = default_remote_url()
    assert not url.startswith(("/", "s3://", "gs://")), "a relative folder, valid in any clone"
    # Relative to .dvc/: the folder next to the project root, outside the git work tree.
    assert (PROJECT / ".dvc" / url).resolve().parent == PROJECT.parent.resolve()


def test_push_then_pull_in_a_fresh_clone_serves_the_model_without_retraining(pushed, tmp_path: Path):
    origin, env = pushed
    remote = (origin / ".dvc" / default_remote_url()).resolve()
    assert remote.is_dir() and any(remote.rglob("*")), "dvc push wrote nothing to the default remote"

    clone = origin.parent / "clone"
    run(["git", "clone", "-q", str(origin), str(clone)], origin.parent, env)
    assert not (clone / "models").exists() and not (clone / "mlflow.db").exists()
    run(["dvc", "pull"], clone, env)

    # The registered model (the register stage's export) and the reports, as in the clone that trained.
    registered = clone / "models" / "registered"
    assert sorted(p.name for p in registered.iterdir()) == ["MODEL_CARD.md", "model.onnx"]
    assert (registered / "model.onnx").read_bytes() == (origin / "models/registered/model.onnx").read_bytes()
    for report in ("reports/metrics.json", "reports/evaluation.json", "models/registration.json"):
        assert (clone / report).read_bytes() == (origin / report).read_bytes(), report
    status = run(["dvc", "status"], clone, env).stdout
    assert "up to date" in status, f"the pulled clone would retrain:\n{status}"

    # Served from the pulled folder: no MLflow store in the clone, none needed.
    import app

    service = app.ModelService(str(registered)).load()
    assert service.ready, service.problem
    assert service.predictor.decision.model_name == "pneumonia-cnn"
    assert service.predictor.decision.model_version == "1"
    outcome = app_results.predict_files([str(EXAMPLES[0])], service, max_file_bytes=20 * 1024 * 1024)
    assert outcome.results[0].error is None and outcome.results[0].label in ("NORMAL", "PNEUMONIA")

    # The predict CLI in the clone, on the pulled model, agrees with the clone that trained it.
    scored = []
    for project in (origin, clone):
        out = tmp_path / f"{project.name}.csv"
        run(["python", "-m", "pipeline.predict", str(EXAMPLES[0]), "--model-uri", "models/registered",
             "--output", str(out)], project, env)
        scored.append(out.read_text().splitlines()[1].split(",")[1:])
    assert scored[0] == scored[1]
    assert not (clone / "mlflow.db").exists()
