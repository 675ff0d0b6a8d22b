"""Fixtures shared by the app's tests: a tiny untrained model as an export bundle, and `app` around it.

Registered for every test module by `pytest_plugins` in conftest.py. Importing them by name into each
module would shadow them (and a module-scoped copy would load another model into the one `app` module).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType

import pytest

from pipeline.registry import BUNDLE_FILE, BUNDLE_MODEL

TINY_CARD = {
    "registered_name": "tiny-test-model", "version": "7", "trained_at": 1_700_000_000_000,
    "git_commit": "0123abc", "run_id": "run-1", "data_digest": "digest-1", "threshold": 0.5,
    "threshold_rule": "youden", "test_images": 12,
    "test_metrics": {"roc_auc": {"value": 0.61, "ci_low": 0.42, "ci_high": 0.8},
                     "ece": {"value": 0.05, "ci_low": None, "ci_high": None}},
}


def write_tiny_bundle(folder: Path, threshold: float = 0.5) -> Path:
    """An export bundle (as `python -m pipeline.export` writes) around an untrained tiny CNN."""
    from pipeline.model import build_model

    folder.mkdir(parents=True, exist_ok=True)
    build_model(64, 32, [4, 8], 0.0).save(folder / BUNDLE_MODEL)
    (folder / BUNDLE_FILE).write_text(json.dumps(
        {"threshold": threshold, "card": TINY_CARD, "input_size": 64, "exported_from": "tests"}))
    return folder


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.fixture(scope="session")
def app_module(tiny_bundle: Path) -> ModuleType:
    """`app`, imported with its environment fallback pointing at the tiny bundle (it loads at import)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PNEUMONIA_MODEL_URI", str(tiny_bundle))
        return importlib.import_module("app")


@pytest.fixture(scope="session")
def service(app_module: ModuleType, tiny_bundle: Path):
    loaded = app_module.SERVICE
    if loaded.uri != str(tiny_bundle):  # `app` was imported earlier in this session, around another model
        loaded = app_module.load_service(str(tiny_bundle))
    assert loaded.ready, loaded.problem
    return loaded
