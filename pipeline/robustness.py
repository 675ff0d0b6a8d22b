"""Stage: how far the model's metrics fall when the images look like other devices and exposures.

Each shift (brightness, contrast, gamma, blur, noise, lower resolution, a tighter frame, histogram
equalisation) is applied to the pixels of every evaluated split (validation, carved test, external); the
serving artefact, with its calibration and threshold, is scored as it will be served, and the share of
shifted X-rays its input gate would refuse is reported beside the metrics (which count every image).
Outputs `reports/robustness.json` (a report, not a DVC metric: it has a row per shift and split) and
`reports/robustness.png`.

Under `served`, the external set's X-rays go through the whole serving path (`scoring.runtime.Predictor`:
checks, orientation, gate) turned by 90, 180 and 270 degrees, mirrored, and with sensor noise: the share
of copies scored, the share whose label differs from the upright image's, and the accuracy of those scored.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import matplotlib
import numpy as np
from PIL import Image, ImageFilter, ImageOps

from pipeline.arrays import has_split, load_split
from pipeline.common import setup_logging, stage_errors, write_json
from pipeline.metrics import point_metrics
from pipeline.params import RobustnessParams, stage_params
from pipeline.paths import ARTEFACT_FILE, ROBUSTNESS_FIGURE, ROBUSTNESS_FILE
from scoring.decision import CLASS_NAMES
from scoring.orientation import ORIENTATIONS, UPRIGHT, orient
from scoring.runtime import Prediction, Predictor, ServingArtefact

matplotlib.use("Agg")
from matplotlib import pyplot as plt

log = logging.getLogger(__name__)

SPLITS = ("val", "test", "external")
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


def zoom_in(factor: float) -> Shift:
    """The central 1/`factor` of each side, resized back: a tighter frame, with less of the body around the
    chest (the training normals show more of it than the pneumonias, so a network can read framing as
    diagnosis)."""
    if factor < 1.0:
        raise ValueError(f"a zoom-in factor is at least 1, got {factor}")

    def transform(image: Image.Image) -> Image.Image:
        width, height = image.size
        left, top = width * (1 - 1 / factor) / 2, height * (1 - 1 / factor) / 2
        return image.resize(image.size, Image.Resampling.BILINEAR, box=(left, top, width - left, height - top))

    return _per_image(transform)


def equalize() -> Shift:
    return _per_image(ImageOps.equalize)


def build_shifts(params: RobustnessParams) -> dict[str, Shift]:
    shifts: dict[str, Shift] = {}
    kinds = ((params.brightness, "brightness {:+g}", brightness), (params.contrast, "contrast x{:g}", contrast),
             (params.gamma, "gamma {:g}", gamma), (params.blur_sigma, "blur sigma {:g}", blur),
             (params.noise_sigma, "noise sigma {:g}", noise), (params.downscale, "resolution {}px", downscale),
             (params.zoom_in, "zoomed in x{:g}", zoom_in))
    for values, label, make in kinds:
        for value in values:
            shifts[label.format(value)] = make(value)
    if params.equalize:
        shifts["histogram equalised"] = equalize()
    return shifts


def measure(model: ServingArtefact, images: np.ndarray, labels: np.ndarray, shifts: dict[str, Shift],
            seed: int) -> dict[str, Any]:
    baseline = _measured(model, images, labels)
    results = {}
    for name, shift in shifts.items():
        metrics = _measured(model, shift(images, np.random.default_rng(seed)), labels)
        metrics.update({f"{key}_change": round(metrics[key] - baseline[key], 4) for key in REPORTED})
        results[name] = metrics
        log.info("%-22s %s", name, {key: metrics[key] for key in REPORTED})
    worst = {key: min(result[f"{key}_change"] for result in results.values()) for key in REPORTED if key != "ece"}
    worst["ece"] = max(result["ece_change"] for result in results.values()) if results else 0.0
    return {"baseline": baseline, "shifts": results, "worst_change": worst}


def _measured(model: ServingArtefact, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The classifier's metrics on every image, and the share of them the input gate would refuse."""
    scores = model.scores(images)
    metrics = _reported(point_metrics(labels, scores.probability, model.decision.threshold))
    limit = model.decision.ood_limit
    metrics["refused_by_gate"] = None if limit is None else round(float(np.mean(scores.ood > limit)), 4)
    return metrics


def _reported(metrics: dict[str, float]) -> dict[str, float]:
    return {key: round(float(metrics[key]), 4) for key in REPORTED}


def served(model: ServingArtefact, images: np.ndarray, labels: np.ndarray, noise_sigmas: list[float],
           seed: int) -> dict[str, Any]:
    """Copies of `images` in every orientation and with each noise level, through the serving path, compared
    with the upright images' own results."""
    predictor = Predictor(model)
    upright = _served(predictor, images)
    copies = {name: np.stack([orient(image, index) for image in images])
              for index, name in enumerate(ORIENTATIONS) if index != UPRIGHT}
    rng = np.random.default_rng(seed)
    copies.update({f"noise sigma {sigma:g}": noise(sigma)(images, rng) for sigma in noise_sigmas})
    report = {"upright": _agreement(upright, upright, labels)}
    for name, shifted in copies.items():
        report[name] = _agreement(_served(predictor, shifted), upright, labels)
        log.info("served, %-45s %s", name, report[name])
    return report


def _served(predictor: Predictor, images: np.ndarray) -> list[Prediction]:
    return predictor.predict((str(index), _png(image)) for index, image in enumerate(images))


def _png(image: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _agreement(results: list[Prediction], upright: list[Prediction], labels: np.ndarray) -> dict[str, Any]:
    scored = np.array([result.scored for result in results])
    both = scored & np.array([result.scored for result in upright])
    differs = [results[i].label != upright[i].label for i in np.flatnonzero(both)]
    correct = [results[i].label == CLASS_NAMES[labels[i]] for i in np.flatnonzero(scored)]
    return {"scored": round(float(scored.mean()), 4), "label_differs_from_upright": _share(differs),
            "accuracy_of_scored": _share(correct), "put_upright": _share([r.note is not None for r in results])}


def _share(flags: list[bool]) -> float | None:
    return round(float(np.mean(flags)), 4) if flags else None


def draw(report: dict[str, Any], path: Any) -> None:
    """Specificity and sensitivity of each split under each shift, at the registered threshold."""
    splits = [split for split in SPLITS if split in report and split != "served"]
    shifts = ["none", *report[splits[0]]["shifts"]]
    figure, axes = plt.subplots(1, 2, figsize=(11, 0.32 * len(shifts) + 1.5), sharey=True)
    for axis, metric in zip(axes, ("specificity", "sensitivity")):
        for offset, split in enumerate(splits):
            values = [report[split]["baseline"][metric]] + [v[metric] for v in report[split]["shifts"].values()]
            axis.barh(np.arange(len(shifts)) + 0.27 * (offset - 1), values, height=0.26, label=split)
        axis.set(xlim=(0, 1), title=metric, yticks=np.arange(len(shifts)), yticklabels=shifts)
        axis.invert_yaxis()
    axes[0].legend(loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def run(seed: int, params: RobustnessParams) -> dict[str, Any]:
    model = ServingArtefact.from_file(ARTEFACT_FILE)
    shifts = build_shifts(params)
    report = {}
    for split in SPLITS:
        if has_split(split):
            data = load_split(split)
            report[split] = measure(model, data.images, data.labels, shifts, seed)
            log.info("%s: worst change under shift %s", split, report[split]["worst_change"])
    served_split = "external" if has_split("external") else "val"
    data = load_split(served_split)
    report["served"] = {"split": served_split,
                        **served(model, data.images, data.labels, params.noise_sigma, seed)}
    write_json(ROBUSTNESS_FILE, report)
    draw(report, ROBUSTNESS_FIGURE)
    return report


def main() -> None:
    setup_logging()
    with stage_errors(log):
        run(*stage_params("robustness"))


if __name__ == "__main__":
    main()
