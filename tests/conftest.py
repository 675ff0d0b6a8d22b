"""Shared fixtures: the committed real X-ray images and a zip archive built from them."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest

pytest_plugins = ["tests.app_fixtures"]

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_DATASET = FIXTURES / "chest_xray"


@pytest.fixture(scope="session")
def fixture_images() -> list[Path]:
    return sorted(FIXTURE_DATASET.rglob("*.jpeg"))


def build_fixture_zip(destination: Path) -> Path:
    """A zip in the public archive layout (chest_xray/train/{NORMAL,PNEUMONIA}) from the fixture images."""
    with zipfile.ZipFile(destination, "w") as archive:
        for path in sorted(FIXTURE_DATASET.rglob("*.jpeg")):
            archive.write(path, path.relative_to(FIXTURES).as_posix())
    return destination


@pytest.fixture(scope="session")
def fixture_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_fixture_zip(tmp_path_factory.mktemp("archive") / "chest-xray-fixture.zip")
