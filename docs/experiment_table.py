"""Print the `dvc exp` experiments as a Markdown table, from the reports each one committed.

    python docs/experiment_table.py [--json exps.json] [--all-commits] [NAME ...]

`dvc exp show --json` (or a saved copy of it) gives each baseline commit and experiment: its name, params and
commit. `dvc exp show` lists only `reports/metrics.json`, so the figures are read from the reports the
pipeline wrote and DVC committed with the experiment (`reports/evaluation.json`, `reports/robustness.json`,
`reports/ood.json`, through `git show`). A row holds the params changed against the baseline, the training
time and epochs, ROC-AUC on validation and the carved test, the external set's figures with their 95%
bootstrap CIs, the threshold and calibration, the input gate, and the worst change under shift per split.
Each baseline is a row too, before its experiments (oldest first); an experiment that has not finished
shows its state and "n/a".
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from pipeline.paths import EVALUATION_FILE, OOD_FILE, ROBUSTNESS_FILE

ROOT = Path(__file__).resolve().parents[1]
REPORTS = {"evaluation": EVALUATION_FILE, "robustness": ROBUSTNESS_FILE, "ood": OOD_FILE}
SPLITS = ("val", "test", "external")
IGNORED_PARAMS = ("data.",)  # where the archives came from, not part of a recipe
Reports = dict[str, dict[str, Any]]


class Entry(NamedTuple):
    name: str
    rev: str
    state: str  # DVC's executor state: success, queued, running or failed
    params: dict[str, Any]
    baseline_params: dict[str, Any]


# --------------------------------------------------------------------------------------------------
# Reading


def entries(shown: list[dict[str, Any]]) -> list[Entry]:
    """Each baseline commit of `dvc exp show --json`, then its experiments, oldest first."""
    found = []
    for baseline in shown:
        if baseline.get("rev") == "workspace":
            continue
        params = params_of(baseline)
        found.append(Entry(baseline.get("name") or baseline["rev"][:7], baseline["rev"], "success", params, params))
        experiments = [experiment(exp_range, params) for exp_range in baseline.get("experiments") or []]
        found += [entry for _, entry in sorted(experiments, key=lambda item: item[0])]
    return found


def experiment(exp_range: dict[str, Any], baseline_params: dict[str, Any]) -> tuple[str, Entry]:
    """(timestamp, entry) of one experiment: its tip commit, the first of its revs."""
    tip = exp_range["revs"][0]
    state = (exp_range.get("executor") or {}).get("state") or "success"
    name = exp_range.get("name") or tip.get("name") or tip["rev"][:7]
    timestamp = (tip.get("data") or {}).get("timestamp") or ""
    return timestamp, Entry(name, tip["rev"], state, params_of(tip), baseline_params)


def params_of(state: dict[str, Any]) -> dict[str, Any]:
    params = ((state.get("data") or {}).get("params") or {}).get("params.yaml") or {}
    return flatten(params.get("data") or {})


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def committed_reports(rev: str) -> Reports:
    """The reports committed at `rev`; an empty one for each the commit lacks."""
    return {name: _committed_json(rev, path) for name, path in REPORTS.items()}


def _committed_json(rev: str, path: Path) -> dict[str, Any]:
    shown = subprocess.run(["git", "show", f"{rev}:{path.as_posix()}"], cwd=ROOT, capture_output=True,
                           text=True, check=False)
    return json.loads(shown.stdout) if shown.returncode == 0 else {}


# --------------------------------------------------------------------------------------------------
# Cells


def dig(tree: Any, *keys: str) -> Any:
    """tree[key][key]..., or None where a level is missing."""
    for key in keys:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def with_ci(metric: dict[str, float] | None) -> str:
    if not metric or metric.get("value") is None:
        return "n/a"
    return f"{metric['value']:.3f} [{metric['ci_low']:.3f}, {metric['ci_high']:.3f}]"


def number(value: float | None, form: str) -> str:
    return "n/a" if value is None else format(value, form)


def split_metric(split: str, name: str) -> Callable[[Reports], str]:
    return lambda reports: with_ci(dig(reports["evaluation"], "splits", split, "metrics", name))


def training(reports: Reports) -> str:
    train = dig(reports["evaluation"], "train") or {}
    if "train_seconds" not in train:
        return "n/a"
    minutes, seconds = divmod(round(train["train_seconds"]), 60)
    return f"{minutes} min {seconds} s, {train.get('epochs_run')} ({train.get('best_epoch')})"


def threshold(reports: Reports) -> str:
    evaluation = reports["evaluation"]
    if "threshold" not in evaluation:
        return "n/a"
    return f"{evaluation['threshold']:.3f} ({evaluation.get('threshold_rule')}, {evaluation.get('calibration_split')})"


def calibration(reports: Reports) -> str:
    evaluation = reports["evaluation"]
    if "calibration" not in evaluation:
        return "n/a"
    return (f"{evaluation['calibration']} (T {number(evaluation.get('temperature'), '.2f')}, "
            f"bias {number(evaluation.get('calibration_bias'), '+.2f')})")


def gate(reports: Reports) -> str:
    ood = reports["ood"]
    return (f"{number(dig(ood, 'x_rays_accepted', 'external'), '.3f')}, "
            f"{number(dig(ood, 'diagnosed_rate', 'near'), '.3f')} / {number(dig(ood, 'diagnosed_rate', 'far'), '.3f')}")


def worst_change(metric: str) -> Callable[[Reports], str]:
    return lambda reports: " / ".join(number(dig(reports["robustness"], split, "worst_change", metric), "+.2f")
                                      for split in SPLITS)


FIGURES: tuple[tuple[str, Callable[[Reports], str]], ...] = (
    ("train time, epochs (best)", training),
    ("val ROC-AUC", split_metric("val", "roc_auc")),
    ("test ROC-AUC", split_metric("test", "roc_auc")),
    ("external ROC-AUC", split_metric("external", "roc_auc")),
    ("external acc.", split_metric("external", "accuracy")),
    ("external sens.", split_metric("external", "sensitivity")),
    ("external spec.", split_metric("external", "specificity")),
    ("external ECE", split_metric("external", "ece")),
    ("threshold (rule, fitted on)", threshold),
    ("calibration", calibration),
    ("gate: external X-rays accepted, outliers diagnosed near / far", gate),
    ("worst spec. change under shift: " + " / ".join(SPLITS), worst_change("specificity")),
    ("worst sens. change under shift: " + " / ".join(SPLITS), worst_change("sensitivity")),
)
COLUMNS = ("run", "change (`-S`)", *(header for header, _ in FIGURES))


# --------------------------------------------------------------------------------------------------
# The table


def changed_params(entry: Entry) -> str:
    before, after = entry.baseline_params, entry.params
    changes = [f"{key}={after.get(key)}" for key in sorted(set(before) | set(after))
               if before.get(key) != after.get(key) and not key.startswith(IGNORED_PARAMS)]
    return "`" + " ".join(changes) + "`" if changes else "(baseline recipe)"


def row(entry: Entry) -> list[str]:
    """The entry's cells; "n/a" for the figures of an experiment that has not finished."""
    finished = entry.state == "success"
    reports = committed_reports(entry.rev) if finished else {name: {} for name in REPORTS}
    name = entry.name if finished else f"{entry.name} ({entry.state})"
    return [name, changed_params(entry), *(cell(reports) for _, cell in FIGURES)]


def markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "| " + " | ".join("---" for _ in COLUMNS) + " |"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def dvc_exp_show(all_commits: bool) -> list[dict[str, Any]]:
    command = [sys.executable, "-m", "dvc", "exp", "show", "--json", *(["--all-commits"] if all_commits else [])]
    return json.loads(subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True).stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="a saved `dvc exp show --json` (default: run it)")
    parser.add_argument("--all-commits", action="store_true", help="every commit's experiments (`dvc exp show -A`)")
    parser.add_argument("names", nargs="*", help="baselines and experiments to print, in this order (default: all)")
    args = parser.parse_args(argv)
    if args.json:
        shown = json.loads(Path(args.json).read_text(encoding="utf-8"))
    else:
        shown = dvc_exp_show(args.all_commits)
    found = {entry.name: entry for entry in entries(shown)}
    names = args.names or list(found)
    missing = [name for name in names if name not in found]
    if missing:
        print(f"no such experiment: {', '.join(missing)} (have: {', '.join(found) or 'none'})", file=sys.stderr)
        return 1
    print(markdown([row(found[name]) for name in names]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
