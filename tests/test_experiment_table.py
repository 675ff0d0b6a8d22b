"""docs/experiment_table.py renders the experiment record from the reports the pipeline commits.

The rows are rendered from the project's own committed `reports/` (HEAD's), so a report the pipeline stops
writing, or a key it renames, shows as "n/a" here and fails the test.
"""

from __future__ import annotations

import copy
import json
import subprocess

import pytest
import yaml

from tests.helpers import PROJECT, docs_script


@pytest.fixture(scope="module")
def table():
    return docs_script("experiment_table")


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=PROJECT, check=True, capture_output=True, text=True).stdout


def state(rev: str, params: dict, timestamp: str | None = None, name: str | None = None) -> dict:
    """One revision as `dvc exp show --json` (DVC 3) lists it."""
    data = {"rev": rev, "timestamp": timestamp, "params": {"params.yaml": {"data": params}}, "metrics": {},
            "deps": {}, "outs": {}, "meta": {}}
    return {"rev": rev, "name": name, "data": data, "error": None, "experiments": None}


@pytest.fixture(scope="module")
def shown() -> list[dict]:
    """HEAD as the baseline, and two experiments on it: `later`, finished, whose commit is HEAD itself (so its
    reports are the committed ones), and `earlier`, still queued."""
    head = git("rev-parse", "HEAD").strip()
    params = yaml.safe_load(git("show", "HEAD:params.yaml"))
    changed = copy.deepcopy(params)
    changed["train"]["dropout"] = 0.5
    changed["data"]["source"] = "../local.zip"
    baseline = state(head, params, "2026-01-01T00:00:00", name="main")
    baseline["experiments"] = [
        {"revs": [state(head, changed, "2026-01-03T00:00:00")], "name": "later", "executor": None},
        {"revs": [state("f" * 40, params, "2026-01-02T00:00:00")], "name": "earlier",
         "executor": {"state": "queued", "name": None, "local": None}},
    ]
    return [state("workspace", params), baseline]


def rendered(table, shown, tmp_path, capsys, *names: str) -> dict[str, list[str]]:
    saved = tmp_path / "exps.json"
    saved.write_text(json.dumps(shown))
    assert table.main(["--json", str(saved), *names]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| " + " | ".join(table.COLUMNS) + " |"
    rows = [line.strip("| ").split(" | ") for line in lines[2:]]
    assert all(len(cells) == len(table.COLUMNS) for cells in rows)
    return {cells[0]: cells for cells in rows}


def test_rows_show_the_committed_reports_and_the_recipe_change(table, shown, tmp_path, capsys):
    rows = rendered(table, shown, tmp_path, capsys)
    assert list(rows) == ["main", "earlier (queued)", "later"]  # the baseline, then oldest first
    main, later = rows["main"], rows["later"]
    # Every figure is found in the reports the pipeline wrote.
    assert "n/a" not in " ".join(main), dict(zip(table.COLUMNS, main))
    assert main[1] == "(baseline recipe)"
    # Where the archive came from is not part of the recipe.
    assert later[1] == "`train.dropout=0.5`" and later[2:] == main[2:]

    evaluation = json.loads(git("show", "HEAD:reports/evaluation.json"))
    cell = dict(zip(table.COLUMNS, main))
    external_auc = evaluation["splits"]["external"]["metrics"]["roc_auc"]
    assert cell["external ROC-AUC"].startswith(f"{external_auc['value']:.3f} [{external_auc['ci_low']:.3f}, ")
    assert cell["threshold (rule, fitted on)"].startswith(f"{evaluation['threshold']:.3f} (")
    assert cell["train time, epochs (best)"].endswith(f", {evaluation['train']['epochs_run']} "
                                                      f"({evaluation['train']['best_epoch']})")


def test_unfinished_experiment_shows_its_state_and_no_figures(table, shown, tmp_path, capsys):
    cells = rendered(table, shown, tmp_path, capsys, "earlier")["earlier (queued)"]
    assert cells[1] == "(baseline recipe)"
    assert set(cells[2:]) == {"n/a", "n/a, n/a / n/a", "n/a / n/a / n/a"}


def test_unknown_experiment_is_an_error_naming_what_exists(table, shown, tmp_path, capsys):
    saved = tmp_path / "exps.json"
    saved.write_text(json.dumps(shown))
    assert table.main(["--json", str(saved), "nope"]) == 1
    assert "no such experiment: nope (have: main, earlier, later)" in capsys.readouterr().err
