"""Temporary copies of the project for tests that run the real stages (`dvc repro`, `python -m pipeline.*`).

A copy holds the pipeline code, dvc.yaml and params.yaml (made tiny), is its own git + DVC repository with
one commit, and gets its own MLflow store (`mlflow.db`, `mlruns/` inside it). Commands run with the
project's virtual environment first on PATH (DVC starts stages with `python`) and without any `MLFLOW_*`
or `DVC_*` variables of the caller, so nothing leaks into or out of the real project.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

PROJECT = Path(__file__).resolve().parents[1]
COPIED = ["pipeline", "dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", "pyproject.toml"]


def run(command: list[str], cwd: Path, env: dict[str, str], expected: int = 0,
        timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a command to completion; fail the test, showing its output, unless it exits `expected`."""
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                            check=False)
    if result.returncode != expected:
        raise AssertionError(f"{' '.join(command)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def project_env(**extra: str) -> dict[str, str]:
    """The caller's environment without MLFLOW_* and DVC_*, the venv's bin first on PATH, quiet tools."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MLFLOW_", "DVC_"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", MLFLOW_DISABLE_TELEMETRY="true",
               DVC_NO_ANALYTICS="1", TF_CPP_MIN_LOG_LEVEL="2", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    env.update(extra)
    return env


def update_params(project: Path, **sections: dict[str, Any]) -> None:
    """Merge values into sections of the copy's params.yaml: update_params(root, train={"epochs": 2})."""
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, values in sections.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def tiny_params(project: Path, archive: Path) -> None:
    """Params for a run of about a minute on the fixture archive: small images, one epoch, few resamples."""
    update_params(
        project,
        data={"source": str(archive), "sha256": None},
        preprocess={"image_size": 64, "val_fraction": 0.25, "test_fraction": 0.25},
        train={"image_size": 32, "filters": [8, 16], "epochs": 1, "batch_size": 8, "patience": 1},
        evaluate={"bootstrap_resamples": 50},
    )


def create_project(root: Path, archive: Path) -> dict[str, str]:
    """Copy the project into `root` with tiny params on `archive`, as a committed git + DVC repository.

    Returns the environment to run commands in it with. Nothing is reproduced yet.
    """
    root.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        source = PROJECT / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.exists():
            shutil.copy2(source, root / name)
    tiny_params(root, archive)
    env = project_env()
    run(["git", "init", "-q"], root, env)
    run(["dvc", "init", "-q"], root, env)
    run(["dvc", "config", "core.analytics", "false"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "fixture project"], root, env)
    return env


def registry_rows(project: Path, query: str) -> list[tuple]:
    """Rows of a query on the copy's MLflow store."""
    with sqlite3.connect(project / "mlflow.db") as connection:
        return connection.execute(query).fetchall()


def peek_rows(project: Path, query: str) -> list[tuple]:
    """Like registry_rows, but read-only and safe while a stage is writing: [] when the store or the
    table does not exist yet, or the database is busy (never creates an empty mlflow.db)."""
    path = project / "mlflow.db"
    if not path.is_file():
        return []
    try:
        connection = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=1)
        try:
            return connection.execute(query).fetchall()
        finally:
            connection.close()
    except sqlite3.OperationalError:  # no such table yet, or locked by a writer
        return []
