"""Print the experiments recorded by `dvc exp` as the Markdown table of docs/experiments.md.

    python docs/experiment_table.py [--json exps.json] [NAME ...]

Reads `dvc exp show --json` (or a saved copy of it), and for each named experiment (all of them by
default) prints the params it changed against its baseline commit, its training time and epochs, and
the validation, carved-test and robustness figures from its reports, with their 95% bootstrap CIs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any

SHIFTS = ("contrast x0.6", "resolution 64px", "blur sigma 1.5", "gamma 0.6")
IGNORED_PARAMS = ("data.",)  # where the archive came from, not part of a recipe
COLUMNS = ("run", "change (`-S`)", "train time, epochs (best)", "val ROC-AUC", "val sens.", "val spec.",
           "threshold", "test ROC-AUC", "test acc.", "test sens.", "test spec.", "test ECE", "T",
           "test spec. under shift: " + " / ".join(SHIFTS), "worst test spec. change",
           "worst val spec. change")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def file_data(revision: dict[str, Any], section: str, path: str) -> dict[str, Any]:
    return (revision.get(section) or {}).get(path, {}).get("data") or {}


def changed_params(baseline: dict[str, Any], experiment: dict[str, Any]) -> str:
    before = flatten(file_data(baseline, "params", "params.yaml"))
    after = flatten(file_data(experiment, "params", "params.yaml"))
    changes = [f"{key}={after.get(key)}" for key in sorted(set(before) | set(after))
               if before.get(key) != after.get(key) and not key.startswith(IGNORED_PARAMS)]
    return "`" + " ".join(changes) + "`" if changes else "(baseline recipe)"


def with_ci(metric: dict[str, float] | None) -> str:
    if not metric:
        return "n/a"
    return f"{metric['value']:.3f} [{metric['ci_low']:.3f}, {metric['ci_high']:.3f}]"


def minutes(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    return f"{int(seconds // 60)} min {int(seconds % 60)} s"


def row(name: str, baseline: dict[str, Any], experiment: dict[str, Any]) -> list[str]:
    training = file_data(experiment, "metrics", "reports/train_metrics.json")
    metrics = file_data(experiment, "metrics", "reports/metrics.json")
    robustness = file_data(experiment, "metrics", "reports/robustness.json")
    val, test = metrics.get("val", {}), metrics.get("test", {})
    shifts = robustness.get("shifts", {})
    under_shift = " / ".join(f"{shifts[shift]['specificity']:.2f}" if shift in shifts else "n/a"
                             for shift in SHIFTS)
    worst = worst_specificity_change(robustness)
    worst_val = worst_specificity_change(robustness.get("val", {}))
    return [
        name, changed_params(baseline, experiment),
        f"{minutes(training.get('train_seconds'))}, {training.get('epochs_run')} ({training.get('best_epoch')})",
        with_ci(val.get("roc_auc")), with_ci(val.get("sensitivity")), with_ci(val.get("specificity")),
        f"{metrics.get('threshold', float('nan')):.3f} ({metrics.get('threshold_rule')})",
        with_ci(test.get("roc_auc")), with_ci(test.get("accuracy")), with_ci(test.get("sensitivity")),
        with_ci(test.get("specificity")), with_ci(test.get("ece")), f"{metrics.get('temperature', float('nan')):.2f}",
        under_shift, "n/a" if worst is None else f"{worst:+.2f}", "n/a" if worst_val is None else f"{worst_val:+.2f}",
    ]


def worst_specificity_change(robustness: dict[str, Any]) -> float | None:
    return min((entry["specificity_change"] for entry in robustness.get("shifts", {}).values()), default=None)


def experiments(shown: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(name, baseline revision data, experiment revision data), oldest first."""
    found = []
    for baseline in shown:
        if baseline.get("rev") == "workspace":
            continue
        for experiment in baseline.get("experiments") or []:
            for revision in experiment.get("revs") or []:
                found.append((revision.get("name") or revision["rev"][:7], baseline["data"], revision["data"]))
    return sorted(found, key=lambda item: item[2].get("timestamp") or "")


def markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "| " + " | ".join("---" for _ in COLUMNS) + " |"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="a saved `dvc exp show --json` (default: run it)")
    parser.add_argument("names", nargs="*", help="experiments to print, in this order (default: all)")
    args = parser.parse_args(argv)
    if args.json:
        with open(args.json, encoding="utf-8") as handle:
            shown = json.load(handle)
    else:
        shown = json.loads(subprocess.run(["dvc", "exp", "show", "--json"], check=True, capture_output=True,
                                          text=True).stdout)
    found = {name: (baseline, experiment) for name, baseline, experiment in experiments(shown)}
    names = args.names or list(found)
    missing = [name for name in names if name not in found]
    if missing:
        print(f"no such experiment: {', '.join(missing)} (have: {', '.join(found) or 'none'})", file=sys.stderr)
        return 1
    print(markdown([row(name, *found[name]) for name in names]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
