"""Stage 6: how far the model's metrics fall when the test images look like other devices and exposures.

Each shift (brightness, contrast, gamma, blur, noise, lower resolution, histogram equalisation) is applied
to the carved test split's pixels (reported) and to the validation split's (under "val": what recipes are
compared on, since choosing on the test split would be selection on it); the model, its calibration and its threshold stay as registered. A
check anyone can run without the official test split: a recipe whose specificity collapses here is
unlikely to hold up on another hospital's normals.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
from PIL import Image, ImageFilter, ImageOps

from pipeline.common import REPORTS_DIR, read_json, setup_logging, stage_params, write_json
from pipeline.evaluate import METRICS_FILE
from pipeline.metrics import point_metrics
from pipeline.preprocess import load_split
from pipeline.serving import Scorer
from pipeline.train import MODEL_FILE

log = logging.getLogger(__name__)

ROBUSTNESS_FILE = REPORTS_DIR / "robustness.json"
REPORTED = ("roc_auc", "accuracy", "sensitivity", "specificity", "ece")

Shift = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _per_image(transform: Callable[[Image.Image], Image.Image]) -> Shift:
    def shift(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return np.stack([np.asarray(transform(Image.fromarray(image))) for image in images])

    return shift


def _clip(values: np.ndarray) -> np.ndarray:
    return np.clip(np.round(values), 0, 255).astype(np.uint8)


def brightness(delta: float) -> Shift:
    return lambda images, rng: _clip(images.astype(np.float32) + delta)


def contrast(factor: float) -> Shift:
    def shift(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        pixels = images.astype(np.float32)
        mean = pixels.mean(axis=(1, 2), keepdims=True)
        return _clip((pixels - mean) * factor + mean)

    return shift


def gamma(exponent: float) -> Shift:
    return lambda images, rng: _clip(255.0 * (images.astype(np.float32) / 255.0) ** exponent)


def blur(sigma: float) -> Shift:
    return _per_image(lambda image: image.filter(ImageFilter.GaussianBlur(radius=sigma)))


def noise(sigma: float) -> Shift:
    return lambda images, rng: _clip(images.astype(np.float32) + rng.normal(0.0, sigma, images.shape))


def downscale(pixels: int) -> Shift:
    """Down to `pixels` a side and back: the detail a lower-resolution detector or export would lose."""
    def transform(image: Image.Image) -> Image.Image:
        small = image.resize((pixels, pixels), Image.Resampling.BILINEAR)
        return small.resize(image.size, Image.Resampling.BILINEAR)

    return _per_image(transform)


def equalize() -> Shift:
    return _per_image(ImageOps.equalize)


def build_shifts(params: dict[str, Any]) -> dict[str, Shift]:
    shifts: dict[str, Shift] = {}
    for delta in params.get("brightness", []):
        shifts[f"brightness {delta:+g}"] = brightness(delta)
    for factor in params.get("contrast", []):
        shifts[f"contrast x{factor:g}"] = contrast(factor)
    for exponent in params.get("gamma", []):
        shifts[f"gamma {exponent:g}"] = gamma(exponent)
    for sigma in params.get("blur_sigma", []):
        shifts[f"blur sigma {sigma:g}"] = blur(sigma)
    for sigma in params.get("noise_sigma", []):
        shifts[f"noise sigma {sigma:g}"] = noise(sigma)
    for pixels in params.get("downscale", []):
        shifts[f"resolution {pixels}px"] = downscale(pixels)
    if params.get("equalize", False):
        shifts["histogram equalised"] = equalize()
    return shifts


def measure(scorer: Scorer, images: np.ndarray, labels: np.ndarray, threshold: float,
            shifts: dict[str, Shift], seed: int) -> dict[str, Any]:
    baseline = _reported(point_metrics(labels, scorer.probabilities(images), threshold))
    results = {}
    for name, shift in shifts.items():
        shifted = shift(images, np.random.default_rng(seed))
        metrics = _reported(point_metrics(labels, scorer.probabilities(shifted), threshold))
        metrics.update({f"{key}_change": round(metrics[key] - baseline[key], 4) for key in REPORTED})
        results[name] = metrics
        log.info("%-22s %s", name, {key: metrics[key] for key in REPORTED})
    worst = {key: min(result[f"{key}_change"] for result in results.values()) for key in REPORTED if key != "ece"}
    worst["ece"] = max(result["ece_change"] for result in results.values()) if results else 0.0
    return {"baseline": baseline, "shifts": results, "worst_change": worst}


def _reported(metrics: dict[str, float]) -> dict[str, float]:
    return {key: round(float(metrics[key]), 4) for key in REPORTED}


def main() -> None:
    setup_logging()
    params = stage_params("robustness")
    report = read_json(METRICS_FILE)
    scorer = Scorer(keras.models.load_model(MODEL_FILE, compile=False, safe_mode=True),
                    temperature=report.get("temperature", 1.0),
                    calibration_bias=report.get("calibration_bias", 0.0))
    shifts = build_shifts(params)
    result = measure(scorer, *load_split("test"), report["threshold"], shifts, params["seed"])
    # The same check on validation, for choosing between recipes: the test figures are only reported.
    result["val"] = measure(scorer, *load_split("val"), report["threshold"], shifts, params["seed"])
    write_json(ROBUSTNESS_FILE, result)
    log.info("worst change under shift: test %s, validation %s", result["worst_change"],
             result["val"]["worst_change"])


if __name__ == "__main__":
    main()
