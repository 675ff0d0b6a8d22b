"""docs/recipe_search.py, the tool behind docs/experiments.md: its settings, its folding of the carved test
split into training, its oracle operating point, and its table of the committed results."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.arrays import NO_SUBTYPE, VIRAL, Split
from tests.helpers import docs_script, project_params


@pytest.fixture(scope="module")
def search():
    return docs_script("recipe_search")


def test_settings_override_the_recipe_and_unknown_ones_are_refused(search):
    recipe = project_params().train
    changed = search.with_overrides(recipe, ["train.residual=true", "train.augment.zoom=0.3", "filters=[8, 16]"])
    assert changed.residual is True and changed.augment.zoom == 0.3 and changed.filters == [8, 16]
    assert changed.epochs == recipe.epochs and recipe.augment.zoom != 0.3
    with pytest.raises(SystemExit, match="unknown setting train.no_such_knob"):
        search.with_overrides(recipe, ["train.no_such_knob=1"])
    # The values are validated as params.yaml's are.
    with pytest.raises(ValueError):
        search.with_overrides(recipe, ["train.residual=maybe"])


def test_folding_the_test_split_keeps_every_field_in_step(search):
    def split(count: int, first_patient: int) -> Split:
        labels = np.arange(count, dtype=np.uint8) % 2
        return Split(np.full((count, 4, 4), first_patient, dtype=np.uint8), labels,
                     np.array([f"p{first_patient + i}" for i in range(count)]),
                     np.where(labels == 1, VIRAL, NO_SUBTYPE).astype(np.int8))

    train, test = split(5, 0), split(3, 100)
    both = search.concatenate(train, test)
    assert len(both) == 8 and both.images.shape == (8, 4, 4)
    assert list(both.patients[5:]) == ["p100", "p101", "p102"] and (both.images[5:] == 100).all()
    np.testing.assert_array_equal(both.subtypes, np.concatenate([train.subtypes, test.subtypes]))


def test_specificity_at_a_sensitivity_is_read_at_the_threshold_that_keeps_it(search):
    labels = np.array([1] * 10 + [0] * 4)
    scores = np.array([0.9] * 9 + [0.2] + [0.1, 0.3, 0.5, 0.95])
    # Keeping 90% of the positives allows the threshold at 0.9: three of four normals fall below it.
    assert search.specificity_at(labels, scores, 0.9) == 0.75
    # All of them needs 0.2: only one normal below.
    assert search.specificity_at(labels, scores, 1.0) == 0.25


def test_the_table_renders_every_committed_result(search, capsys):
    results = sorted(search.RESULTS.glob("*.json"))
    assert results, "docs/recipe-search/ holds the recorded runs"
    assert search.main(["--table"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert len(rows) == 2 + len(results)
    for path in results:
        result = json.loads(path.read_text())
        row = next(row for row in rows if row.startswith(f"| {result['name']} |"))
        assert f"{result['roc_auc']['external']['value']:.3f}" in row


def test_external_figures_are_reported_out_of_fold_as_the_pipeline_would(search):
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 60).astype(np.uint8)
    split = Split(np.zeros((120, 4, 4), np.uint8), labels, np.array([f"p{i // 2}" for i in range(120)]),
                  np.full(120, NO_SUBTYPE, np.int8))
    separated = np.clip(labels * 0.6 + 0.2 + rng.normal(0, 0.05, 120), 0.01, 0.99)
    clear = search.as_reported(split, separated, seed=1)
    assert clear["accuracy"] > 0.95 and clear["log_loss"] < 0.2 and clear["review_share"] < 0.1
    muddled = search.as_reported(split, rng.uniform(0.01, 0.99, 120), seed=1)
    assert muddled["log_loss"] > 0.6 and muddled["accuracy"] < 0.7
    assert set(clear) >= {"accuracy", "sensitivity", "specificity", "ece", "log_loss", "review_share"}
