"""How a trained network's ROC-AUC moves when the images are framed differently: a diagnostic behind
docs/experiments.md (round 3), never part of the pipeline.

    python docs/framing_probe.py [--model models/model.keras] [--splits val external] [--output FILE.json]

Each image is shrunk about its centre by a factor (1: unchanged; 0.85: the content fills the central 85%
of the side) and the uncovered border filled either with the image's edge pixels (`nearest`) or black
(`constant`), then scored by the Keras model on the prepared splits (`dvc repro` first). Raw scores,
threshold-free: the question is whether the ranking depends on the framing, not where the threshold sits.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

FACTORS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
FILLS = ("nearest", "constant")


def shrink(images: np.ndarray, factor: float, fill: str) -> np.ndarray:
    """`images` (N x H x W) with their content scaled by `factor` about the centre."""
    from scipy.ndimage import affine_transform

    if factor == 1.0:
        return images.astype(np.float32)
    height, width = images.shape[1:]
    centre = np.array([height / 2, width / 2])
    matrix = np.eye(2) / factor  # output pixel -> the input pixel it samples
    offset = centre - matrix @ centre
    return np.stack([affine_transform(image.astype(np.float32), matrix, offset=offset, order=1, mode=fill,
                                      cval=0.0) for image in images])


def probe(model_path: Path, split_names: list[str]) -> dict[str, dict[str, float]]:
    import keras
    from sklearn.metrics import roc_auc_score

    import pipeline.model  # noqa: F401  (registers the custom layers the saved model uses)
    from pipeline.arrays import load_split

    model = keras.saving.load_model(model_path, compile=False)
    results: dict[str, dict[str, float]] = {}
    for name in split_names:
        split = load_split(name)
        results[name] = {}
        for factor in FACTORS:
            for fill in FILLS if factor != 1.0 else ("none",):
                pixels = shrink(split.images, factor, fill)[..., np.newaxis]
                scores = model.predict(pixels, batch_size=64, verbose=0).reshape(-1)
                results[name][f"{factor:g} {fill}"] = round(float(roc_auc_score(split.labels, scores)), 4)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/model.keras"))
    parser.add_argument("--splits", nargs="+", default=["val", "external"])
    parser.add_argument("--output", type=Path, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    results = probe(args.model, args.splits)
    text = json.dumps({"model": str(args.model), "roc_auc": results}, indent=1)
    if args.output:
        args.output.write_text(text + "\n", encoding="utf-8")
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
