"""Would more test-time views than the mirror rank the external set better? A diagnostic for
docs/experiments.md (round 9).

    python docs/tta_check.py NAME [NAME ...]    # networks saved by docs/recipe_search.py

For each network, the external ROC-AUC of the pneumonia logit as served (the image and its mirror,
averaged), of other views (zoomed in or out by 10%, shifted by 6 px each way; each with its mirror except
the shifts), and of the served logit averaged with each of them. No weight, threshold or calibration is
fitted: the external set only ranks the options.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from PIL import Image
from recipe_search import MODELS, served_logit

SCALE = 1.1
SHIFT = 6


def zoomed_out(images: np.ndarray, factor: float) -> np.ndarray:
    """The whole X-ray shrunk by `factor` in the centre, the border continued from its edge (as training fills)."""
    side = images.shape[1]
    kept = round(side / factor)
    before = (side - kept) // 2
    after = side - kept - before
    return np.stack([np.pad(np.asarray(Image.fromarray(image).resize((kept, kept), Image.BILINEAR)),
                            ((before, after), (before, after)), mode="edge") for image in images])


def shifted(images: np.ndarray, rows: int, columns: int) -> np.ndarray:
    return np.roll(images, (rows, columns), axis=(1, 2))


def logits(model, images: np.ndarray, mirrored: bool = True) -> np.ndarray:
    return served_logit(model, images.astype(np.float32)[..., np.newaxis], mirrored)


def check(name: str) -> dict[str, float]:
    import keras
    from sklearn.metrics import roc_auc_score

    from pipeline.arrays import load_split
    from pipeline.robustness import zoom_in

    external = load_split("external")
    model = keras.models.load_model(MODELS / f"{name}.keras", compile=False, safe_mode=True)
    served = logits(model, external.images)
    views = {
        f"zoomed in x{SCALE}": logits(model, zoom_in(SCALE)(external.images, np.random.default_rng(0))),
        f"zoomed out x{SCALE}": logits(model, zoomed_out(external.images, SCALE)),
        f"shifted {SHIFT} px (4 ways)": np.mean([logits(model, shifted(external.images, rows, columns), False)
                                                 for rows, columns in ((SHIFT, 0), (-SHIFT, 0), (0, SHIFT), (0, -SHIFT))],
                                                axis=0),
    }
    result = {"served": roc_auc_score(external.labels, served)}
    for view, values in views.items():
        result[view] = roc_auc_score(external.labels, values)
        result[f"served + {view}"] = roc_auc_score(external.labels, served + values)
    result["served + all three"] = roc_auc_score(external.labels, served + sum(views.values()))
    return {key: round(float(value), 4) for key, value in result.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="+")
    args = parser.parse_args(argv)
    for name in args.names:
        print(json.dumps({"name": name, "external_roc_auc": check(name)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
