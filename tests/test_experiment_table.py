"""docs/experiment_table.py: the experiment record is rendered from `dvc exp show --json` as documented."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "experiment_table.py"


@pytest.fixture(scope="module")
def table():
    spec = importlib.util.spec_from_file_location("experiment_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def metric(value: float) -> dict[str, float]:
    return {"value": value, "ci_low": value - 0.01, "ci_high": value + 0.005}


def revision(params: dict, timestamp: str, name: str | None = None, with_reports: bool = True) -> dict:
    metrics = {}
    if with_reports:
        split = {key: metric(0.95) for key in ("roc_auc", "accuracy", "sensitivity", "specificity", "ece")}
        metrics = {
            "reports/train_metrics.json": {"data": {"train_seconds": 125.0, "epochs_run": 9, "best_epoch": 6}},
            "reports/metrics.json": {"data": {"val": split, "test": split, "threshold": 0.4321,
                                              "threshold_rule": "youden", "temperature": 0.9}},
            "reports/robustness.json": {"data": {"shifts": {
                "contrast x0.6": {"specificity": 0.9, "specificity_change": -0.05},
                "resolution 64px": {"specificity": 0.8, "specificity_change": -0.15}}}},
        }
    return {"rev": "0" * 40, "name": name, "timestamp": timestamp,
            "params": {"params.yaml": {"data": params}}, "metrics": metrics}


def shown() -> list[dict]:
    base = {"seed": 42, "data": {"source": "https://example.org/x.zip"}, "train": {"dropout": 0.3, "epochs": 15}}
    changed = {"seed": 42, "data": {"source": "../local.zip"}, "train": {"dropout": 0.5, "epochs": 15}}
    return [
        {"rev": "workspace", "name": None, "data": revision(base, "t0"), "experiments": None},
        {"rev": "abc", "name": "main", "data": revision(base, "t0"), "experiments": [
            {"revs": [{"rev": "1" * 40, "name": "later", "data": revision(changed, "2026-01-02")}]},
            {"revs": [{"rev": "2" * 40, "name": "earlier", "data": revision(base, "2026-01-01")}]},
        ]},
    ]


def test_rows_show_the_recipe_change_and_the_figures(table, tmp_path, capsys):
    saved = tmp_path / "exps.json"
    saved.write_text(json.dumps(shown()))
    assert table.main(["--json", str(saved)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[0].startswith("| run |")
    earlier, later = lines[2], lines[3]  # oldest first, whatever order DVC lists them in
    assert earlier.startswith("| earlier | (baseline recipe) | 2 min 5 s, 9 (6) |")
    # The data source is where the archive came from, not part of the recipe.
    assert "`train.dropout=0.5`" in later and "data.source" not in later
    assert "0.950 [0.940, 0.955]" in later and "0.432 (youden)" in later
    assert "0.90 / 0.80 / n/a / n/a" in later and "| -0.15 |" in later


def test_unknown_experiment_is_an_error_naming_what_exists(table, tmp_path, capsys):
    saved = tmp_path / "exps.json"
    saved.write_text(json.dumps(shown()))
    assert table.main(["--json", str(saved), "nope"]) == 1
    assert "no such experiment: nope" in capsys.readouterr().err


def test_unfinished_experiment_prints_placeholders(table):
    row = table.row("running", revision({}, "t"), revision({}, "t", with_reports=False))
    assert row[2] == "n/a, None (None)" and row[3] == "n/a"
