"""How large an ECE a perfectly calibrated model would show on a test set of a given size: the noise floor
under the issue's ECE target.

    python docs/ece_floor.py [--sizes 279 345] [--draws 5000]

Takes the external set's calibration curve (`reports/plots/external/calibration.json`: the out-of-fold
probabilities, ten bins), treats each bin's mean probability as the truth, draws labels from it and
measures the ECE with the pipeline's own function (`pipeline.metrics.expected_calibration_error`). Each
image keeps its bin's mean probability, so this is an approximation of the served distribution.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from pipeline.metrics import expected_calibration_error

CURVE = Path("reports/plots/external/calibration.json")


def probabilities(curve: list[dict[str, float]]) -> np.ndarray:
    return np.concatenate([np.full(int(b["count"]), float(b["mean_predicted"])) for b in curve])


def floor(served: np.ndarray, size: int, draws: int, seed: int) -> dict[str, float]:
    """The ECE of labels drawn from the probabilities themselves (calibrated by construction)."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(draws):
        sample = rng.choice(served, size=size)
        labels = (rng.random(size) < sample).astype(float)
        values.append(expected_calibration_error(labels, sample))
    values = np.asarray(values)
    return {"median": round(float(np.median(values)), 4), "p90": round(float(np.quantile(values, 0.9)), 4),
            "share_over_0.03": round(float(np.mean(values > 0.03)), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[279, 345])
    parser.add_argument("--draws", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    served = probabilities(json.loads(CURVE.read_text(encoding="utf-8")))
    for size in args.sizes:
        print(json.dumps({"images": size, **floor(served, size, args.draws, args.seed)}))


if __name__ == "__main__":
    main()
