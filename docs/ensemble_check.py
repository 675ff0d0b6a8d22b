"""Would an ensemble (or a network distilled from one) rank the external set better? A diagnostic on saved
recipe-search runs, no training:

    python docs/ensemble_check.py NAME NAME [NAME ...]

Scores each saved network (`models/recipe-search/NAME.keras`) as served (the image and its mirror), then
every combination of two or more by their averaged logits, and prints the external ROC-AUC and the
specificity at sensitivity 0.93 of each. If the members' errors were independent, averaging would lift the
ranking; if they share their errors, no ensemble, and no network distilled from one, can. A second table
follows the first network's hardest normals (the 15 it scores highest) through every network: the share of
pneumonias each scores below them.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import numpy as np
from recipe_search import MODELS, logit, specificity_at


def external_logits(names: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    import keras

    from pipeline.arrays import load_split
    from pipeline.artefact import build
    from scoring.decision import Decision
    from scoring.runtime import ServingArtefact

    external = load_split("external")
    logits = {}
    for name in names:
        model = keras.models.load_model(MODELS / f"{name}.keras", compile=False, safe_mode=True)
        served = ServingArtefact(build(model, Decision(0.5, "none", int(model.input_shape[1]))))
        logits[name] = logit(served.scores(external.images).probability)
    return external.labels, logits


def table(labels: np.ndarray, logits: dict[str, np.ndarray]) -> str:
    from sklearn.metrics import roc_auc_score

    rows = ["| networks | external ROC-AUC | external spec. at sens. 0.93 |", "| --- | --- | --- |"]
    for size in range(1, len(logits) + 1):
        for members in itertools.combinations(logits, size):
            scores = np.mean([logits[name] for name in members], axis=0)
            rows.append(f"| {' + '.join(members)} | {roc_auc_score(labels, scores):.4f} | "
                        f"{specificity_at(labels, scores, 0.93):.3f} |")
    return "\n".join(rows)


HARDEST = 15


def shared_errors(labels: np.ndarray, logits: dict[str, np.ndarray]) -> str:
    reference = next(iter(logits.values()))
    normals = np.flatnonzero(labels == 0)
    hardest = normals[np.argsort(-reference[normals])][:HARDEST]
    rows = [f"| network | share of pneumonias scored below the first network's {HARDEST} hardest normals |",
            "| --- | --- |"]
    for name, scores in logits.items():
        pneumonias = np.sort(scores[labels == 1])
        below = np.searchsorted(pneumonias, scores[hardest]) / len(pneumonias)
        rows.append(f"| {name} | {below.mean():.3f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="+", metavar="NAME", help="saved recipe-search runs")
    args = parser.parse_args(argv)
    labels, logits = external_logits(args.names)
    print(table(labels, logits))
    print()
    print(shared_errors(labels, logits))
    return 0


if __name__ == "__main__":
    sys.exit(main())
