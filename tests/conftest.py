"""Shared fixtures. Plain helpers live in tests/helpers.py.

Every test session gets its own Gradio cache folder, removed at the end, so no upload or heatmap of a
test (DICOM files with patient names among them) is left in the machine's shared cache.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import settings

from tests.helpers import CHROMIUM, CHROMIUM_ARGS, build_fixture_zip, write_tiny_bundle

_SESSION_CACHE = Path(tempfile.mkdtemp(prefix="pneumonia-tests-gradio-"))
os.environ["GRADIO_TEMP_DIR"] = str(_SESSION_CACHE)  # before Gradio is imported anywhere
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


# CI replays the same examples on every run: a gate that passes or fails by the luck of the draw says
# nothing. Locally, fuzzing explores new examples each time.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def gradio_cache() -> Path:
    return _SESSION_CACHE


@pytest.fixture(scope="session")
def fixture_images() -> list[Path]:
    from tests.helpers import FIXTURE_DATASET

    return sorted(FIXTURE_DATASET.rglob("*.jpeg"))


@pytest.fixture(scope="session")
def fixture_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_fixture_zip(tmp_path_factory.mktemp("archive") / "chest-xray-fixture.zip")


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An exported model folder around an untrained tiny CNN: its scores mean nothing, its contracts hold."""
    return write_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.fixture(scope="session")
def app_module(tiny_bundle: Path) -> Iterator[ModuleType]:
    """`app`, imported with its environment fallback pointing at the tiny bundle."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PNEUMONIA_MODEL_URI", str(tiny_bundle))
        yield importlib.import_module("app")


@pytest.fixture(scope="session")
def service(app_module: ModuleType, tiny_bundle: Path):
    loaded = app_module.SERVICE
    if loaded.uri != str(tiny_bundle):  # `app` was imported earlier in this session, around another model
        loaded = app_module.ModelService(str(tiny_bundle))
    assert loaded.load().ready, loaded.problem
    return loaded


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    """Headless Chromium through Playwright, for the tests marked `browser`."""
    if not CHROMIUM.exists():
        pytest.skip("needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()
