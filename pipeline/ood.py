"""Stage: the input gate. Is it a chest X-ray? Fit the gate and other candidate out-of-distribution scores,
measure them side by side, and build the final serving artefact with the gate inside it.

- Candidates, all computed from what the network already sees:
  - `mahalanobis`: squared Mahalanobis distance (per feature) of globally pooled block outputs to the nearer
    class mean, tied covariance, fitted on the training images (Lee et al. 2018), on the last block alone
    or summed over the last `ood.blocks` blocks (as FRODO, Cao et al., MIDL 2019, sums layers);
  - `energy`: the free energy of the two-class logit, -log(1 + e^z) (Liu et al. 2020);
  - `pca`: reconstruction error of the 32 x 32 image by the training images' leading principal components
    (a linear autoencoder).
- The limit is set on X-rays only: the `ood.accept_rate` quantile of the validation images' scores.
- Outlier sets come from what installed packages ship (no downloads). Far: natural images of scikit-image,
  scikit-learn and matplotlib (in colour and in grey), and synthetic noise, gradients, text and
  checkerboards. Near: pydicom's other-modality test files, and validation X-rays rotated, inverted or
  cropped to a quarter. AUROCs are reported on the `tune` outliers (synthetic and scikit-learn) apart from
  the other far ones and the near ones.
- The gate is not chosen here: it is always `mahalanobis` summed over the last `ood.blocks` blocks
  (`CHOSEN`); the other candidates are measured beside it, for comparison only.
- Every outlier goes through the serving path's decoding and plausibility checks first: "diagnosed" is
  what would really get a label.

Outputs: `models/serving.onnx` (the calibrated artefact plus the gate) and `reports/ood.json`.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import keras
import numpy as np
from PIL import Image, ImageDraw, ImageOps
from sklearn.metrics import roc_auc_score

from pipeline import artefact
from pipeline.arrays import has_split, load_split
from pipeline.common import setup_logging, stage_errors, write_json
from pipeline.model import model_parts
from pipeline.params import OodParams, stage_params
from pipeline.paths import ARTEFACT_FILE, CALIBRATED_FILE, MODEL_FILE, OOD_FILE
from scoring import checks
from scoring.imaging import ImageDecodeError, decode_greyscale, resize_grey
from scoring.runtime import Predictor, ServingArtefact

log = logging.getLogger(__name__)

CHOSEN = "mahalanobis"
PCA_SIDE, PCA_COMPONENTS = 32, 32
# Ridge on the covariance: pooled ReLU features have near-constant channels.
COVARIANCE_RIDGE = 1e-3
XRAY_SPLITS = ("val", "test", "external")
TUNE_SOURCES = ("synthetic", "scikit-learn")


# --------------------------------------------------------------------------------------------------
# Candidate scores


@dataclass(frozen=True)
class Features:
    """What the network computes for a batch: globally pooled outputs of the gated blocks and the logits."""

    pooled: list[np.ndarray]
    logits: np.ndarray


def block_outputs(keras_model: keras.Model, blocks: int) -> list[str]:
    """The last `blocks` stage outputs' layer names (the model's parts, `pipeline.model.model_parts`)."""
    names = model_parts(keras_model).stages
    if blocks > len(names):
        raise ValueError(f"ood.blocks is {blocks}, but the network has {len(names)} stages")
    return list(names[-blocks:])


def network_features(keras_model: keras.Model, layers: list[str], images, batch_size: int = 64) -> Features:
    head = model_parts(keras_model).heads["pneumonia"]
    pooled_layers = [keras.layers.GlobalAveragePooling2D()(keras_model.get_layer(name).output) for name in layers]
    extractor = keras.Model(keras_model.inputs, [*pooled_layers, head.input])
    size = int(keras_model.input_shape[1])
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = np.stack([resize_grey(image, size) for image in images[start:start + batch_size]])
        chunks.append([out.numpy() for out in extractor(batch.astype(np.float32)[..., np.newaxis], training=False)])
    parts = [np.concatenate([chunk[index] for chunk in chunks]) for index in range(len(layers) + 1)]
    kernel, bias = head.get_weights()
    return Features(parts[:-1], (parts[-1] @ kernel)[:, 0] + bias[0])


def fit_layer(layer: str, features: np.ndarray, labels: np.ndarray) -> artefact.LayerGate:
    """Class means and a factor of the tied precision matrix of the training images' pooled features."""
    means = np.stack([features[labels == label].mean(axis=0) for label in (0, 1)])
    centred = features - means[labels.astype(int)]
    covariance = centred.T @ centred / len(features)
    covariance += COVARIANCE_RIDGE * np.trace(covariance) / len(covariance) * np.eye(len(covariance))
    return artefact.LayerGate(layer, means, np.linalg.cholesky(np.linalg.inv(covariance)))


def energy(logits: np.ndarray) -> np.ndarray:
    """Higher for inputs the network is less sure are anything: -log(1 + e^z) is near 0 for z << 0 too,
    which is the binary energy score's known weakness (a confident NORMAL looks like an outlier)."""
    return -np.logaddexp(0.0, logits)


@dataclass(frozen=True)
class Pca:
    mean: np.ndarray
    components: np.ndarray

    @classmethod
    def fit(cls, images: np.ndarray) -> Pca:
        data = _small(images)
        mean = data.mean(axis=0)
        _, _, vectors = np.linalg.svd(data - mean, full_matrices=False)
        return cls(mean, vectors[:PCA_COMPONENTS])

    def error(self, images: np.ndarray) -> np.ndarray:
        centred = _small(images) - self.mean
        reconstruction = centred @ self.components.T @ self.components
        return np.mean(np.square(centred - reconstruction), axis=1)


def _small(images: np.ndarray) -> np.ndarray:
    return np.stack([resize_grey(image, PCA_SIDE).astype(np.float32).ravel() / 255.0 for image in images])


# --------------------------------------------------------------------------------------------------
# Outlier sets, from what installed packages ship


@dataclass(frozen=True)
class Outlier:
    name: str
    source: str  # where it comes from: tune on some sources, report on the others
    kind: str  # far or near
    data: bytes


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _pictures(source: str, pictures: Iterator[tuple[str, np.ndarray]]) -> Iterator[Outlier]:
    """Each picture as a file, in colour (as shipped) and as a greyscale copy, which the colour check
    cannot catch."""
    for name, pixels in pictures:
        image = Image.fromarray(np.asarray(pixels))
        image = image.convert("RGB") if image.mode not in ("L", "RGB") else image
        yield Outlier(f"{source}/{name}", source, "far", _png(image))
        if image.mode != "L":
            yield Outlier(f"{source}/{name} (grey)", source, "far", _png(image.convert("L")))


def scikit_image_pictures() -> Iterator[tuple[str, np.ndarray]]:
    import skimage.data

    folder = Path(skimage.data.__file__).parent
    for path in sorted(folder.glob("*.png")) + sorted(folder.glob("*.jpg")):
        with Image.open(path) as image:
            yield path.stem, np.asarray(image.convert("RGB") if image.mode not in ("L", "RGB") else image)


def scikit_learn_pictures() -> Iterator[tuple[str, np.ndarray]]:
    from sklearn.datasets import load_sample_images

    sample = load_sample_images()
    for name, pixels in zip(sample.filenames, sample.images):
        yield Path(name).stem, pixels


def matplotlib_pictures() -> Iterator[tuple[str, np.ndarray]]:
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "sample_data"
    for path in sorted(folder.glob("*.png")) + sorted(folder.glob("*.jpg")):
        with Image.open(path) as image:
            yield path.stem, np.asarray(image.convert("RGB"))


def synthetic_pictures(seed: int) -> Iterator[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    size = 256
    ramp = np.linspace(0, 255, size)
    y, x = np.mgrid[0:size, 0:size]
    yield "uniform noise", rng.integers(0, 256, (size, size), dtype=np.uint8)
    yield "gaussian noise", np.clip(rng.normal(128, 40, (size, size)), 0, 255).astype(np.uint8)
    yield "horizontal gradient", np.tile(ramp, (size, 1)).astype(np.uint8)
    yield "radial gradient", np.clip(255 - np.hypot(x - size / 2, y - size / 2) * 1.6, 0, 255).astype(np.uint8)
    for cells in (4, 16, 64):
        yield f"checkerboard {cells}", (((x // (size // cells)) + (y // (size // cells))) % 2 * 255).astype(np.uint8)
    for lines in (6, 20):
        page = Image.new("L", (size, size), 245)
        draw = ImageDraw.Draw(page)
        for line in range(lines):
            draw.text((8, 4 + line * (size // lines)), "Patient report: findings within normal limits " * 2, fill=20)
        yield f"text page {lines} lines", np.asarray(page)
    shapes = Image.new("L", (size, size), 30)
    draw = ImageDraw.Draw(shapes)
    for _ in range(12):
        box = sorted(rng.integers(0, size, 2)), sorted(rng.integers(0, size, 2))
        draw.ellipse([box[0][0], box[1][0], box[0][1], box[1][1]], fill=int(rng.integers(60, 255)))
    yield "random ellipses", np.asarray(shapes)


def pydicom_files() -> Iterator[Outlier]:
    """pydicom's own test files that hold an image of another modality than a chest radiograph."""
    import pydicom
    from pydicom.data import get_testdata_files

    for path in sorted(get_testdata_files(), key=lambda p: Path(p).name):
        try:
            modality = str(pydicom.dcmread(path, stop_before_pixels=True).get("Modality", ""))
        except Exception:  # noqa: BLE001, S112 (malformed test files are the decoder's tests, not ours)
            continue
        if modality and modality not in ("CR", "DX"):
            yield Outlier(f"pydicom/{Path(path).name} ({modality})", "pydicom", "near", Path(path).read_bytes())


def transformed_xrays(images: np.ndarray, count: int = 60) -> Iterator[Outlier]:
    """Validation X-rays made into what is no longer a usable X-ray: inverted, or a quarter of one. (Turned
    and mirrored X-rays are not outliers: serving puts them back upright; `pipeline.robustness` reports
    them.)"""
    step = max(1, len(images) // count)
    transforms: dict[str, Callable[[Image.Image], Image.Image]] = {
        "inverted": ImageOps.invert,
        "quarter": lambda image: image.crop((0, 0, image.width // 2, image.height // 2)),
    }
    for index in range(0, len(images), step)[:count]:
        image = Image.fromarray(images[index])
        for name, transform in transforms.items():
            yield Outlier(f"x-ray {index} {name}", f"x-ray {name}", "near", _png(transform(image)))


def outlier_sets(seed: int, val_images: np.ndarray) -> list[Outlier]:
    outliers = list(_pictures("synthetic", synthetic_pictures(seed)))
    outliers += _pictures("scikit-learn", scikit_learn_pictures())
    outliers += _pictures("scikit-image", scikit_image_pictures())
    outliers += _pictures("matplotlib", matplotlib_pictures())
    outliers += pydicom_files()
    outliers += transformed_xrays(val_images)
    return outliers


# --------------------------------------------------------------------------------------------------
# Measuring


def decode_for_gate(outliers: list[Outlier]) -> tuple[list[Outlier], np.ndarray, dict[str, int]]:
    """(the outliers that reach the model, their decoded images, counts of those refused before it)."""
    reached, images, refused = [], [], {"undecodable": 0, "plausibility checks": 0}
    for outlier in outliers:
        try:
            grey = decode_greyscale(outlier.data)
        except ImageDecodeError:
            refused["undecodable"] += 1
            continue
        if checks.implausibility(outlier.data, grey):
            refused["plausibility checks"] += 1
            continue
        reached.append(outlier)
        images.append(grey)
    return reached, images, refused


def auroc(inliers: np.ndarray, outliers: np.ndarray) -> float | None:
    """AUROC of telling outliers (positive) from X-rays by a score that is higher for outliers."""
    if len(inliers) == 0 or len(outliers) == 0:
        return None
    labels = np.r_[np.zeros(len(inliers)), np.ones(len(outliers))]
    return round(float(roc_auc_score(labels, np.r_[inliers, outliers])), 4)


def evaluate_gate(seed: int, params: OodParams, keras_model: keras.Model) -> tuple[artefact.Gate, float, dict]:
    layers = block_outputs(keras_model, params.blocks)
    train = load_split("train")
    train_features = network_features(keras_model, layers, train.images)
    layer_gates = [fit_layer(name, pooled, train.labels) for name, pooled in zip(layers, train_features.pooled)]
    gate, last_block = artefact.Gate(tuple(layer_gates)), artefact.Gate((layer_gates[-1],))
    pca = Pca.fit(train.images)

    def candidates(images) -> dict[str, np.ndarray]:
        features = network_features(keras_model, layers, images)
        return {CHOSEN: gate.score(features.pooled), "mahalanobis, last block only": last_block.score(features.pooled[-1:]),
                "energy": energy(features.logits), "pca": pca.error(images)}

    xrays = {split: candidates(load_split(split).images) for split in XRAY_SPLITS if has_split(split)}
    limit = float(np.quantile(xrays["val"][CHOSEN], params.accept_rate))
    outliers = outlier_sets(seed, load_split("val").images)
    reached, images, refused_before = decode_for_gate(outliers)
    scores = candidates(images)
    all_xrays = {name: np.concatenate([values[name] for values in xrays.values()]) for name in scores}
    diagnosed = {outlier.name for outlier, score in zip(reached, scores[CHOSEN]) if score <= limit}
    report: dict[str, Any] = {
        "chosen": f"{CHOSEN} ({', '.join(layers)})", "limit": limit, "accept_rate_target": params.accept_rate,
        "x_rays_accepted": {split: round(float(np.mean(values[CHOSEN] <= limit)), 4) for split, values in xrays.items()},
        "x_ray_images": {split: len(values[CHOSEN]) for split, values in xrays.items()},
        "outliers": len(outliers), "refused_before_the_model": refused_before,
        "diagnosed_rate": {kind: _rate([o.name in diagnosed for o in outliers if o.kind == kind])
                           for kind in ("far", "near")},
        "auroc": {}, "by_source": {},
    }
    groups = {"tune (far: synthetic, scikit-learn)": lambda o: o.source in TUNE_SOURCES,
              "report, far (scikit-image, matplotlib)": lambda o: o.kind == "far" and o.source not in TUNE_SOURCES,
              "report, near (all)": lambda o: o.kind == "near"}
    for group, member in groups.items():
        mask = np.array([member(outlier) for outlier in reached], dtype=bool)
        report["auroc"][group] = {name: auroc(all_xrays[name], values[mask]) for name, values in scores.items()}
    for source in sorted({outlier.source for outlier in outliers}):
        mask = np.array([outlier.source == source for outlier in reached], dtype=bool)
        members = [outlier for outlier in outliers if outlier.source == source]
        report["by_source"][source] = {
            "files": len(members), "reached_the_model": int(mask.sum()),
            "diagnosed_rate": _rate([outlier.name in diagnosed for outlier in members]),
            "auroc_vs_x_rays": {name: auroc(all_xrays[name], values[mask]) for name, values in scores.items()},
        }
    return gate, limit, report


def _rate(flags: list[bool]) -> float | None:
    return round(float(np.mean(flags)), 4) if flags else None


def served_outcomes(serving: bytes, seed: int) -> dict[str, Any]:
    """What the final artefact's serving path (checks, orientation, gate) does with every outlier: the share
    given a diagnosis, by kind and by source. The gate's candidates above are compared on the gate's score
    alone; this is what a user would see."""
    outliers = outlier_sets(seed, load_split("val").images)
    results = Predictor(ServingArtefact(serving)).predict((outlier.name, outlier.data) for outlier in outliers)
    diagnosed = {result.name for result in results if result.scored}
    return {"diagnosed_rate": {kind: _rate([o.name in diagnosed for o in outliers if o.kind == kind])
                               for kind in ("far", "near")},
            "diagnosed_by_source": {source: _rate([o.name in diagnosed for o in outliers if o.source == source])
                                    for source in sorted({outlier.source for outlier in outliers})}}


# The orientation output is used only if it is sure of the upright orientation of at least this share of the
# validation X-rays: a network that has not learnt orientation (a short run, `train.orientation_rate` 0)
# would otherwise refuse every X-ray as "which way up" unclear.
ORIENTATION_COMPETENCE = 0.5


def orientation_check(keras_model: keras.Model, confidence: float) -> tuple[float | None, dict[str, Any]]:
    """(the orientation confidence the decision uses, or None to score images as given; the report)."""
    from scoring.decision import Decision
    from scoring.orientation import UPRIGHT

    probe = Decision(0.5, "none", int(keras_model.input_shape[1]), orientation_confidence=confidence)
    images = load_split("val").images.astype(np.float32)[..., np.newaxis]
    probabilities = keras_model.predict(images, batch_size=64, verbose=0)["orientation"]
    upright = float(np.mean([probe.orientation(row) == UPRIGHT for row in probabilities]))
    used = upright >= ORIENTATION_COMPETENCE
    if not used:
        log.warning("the orientation output is sure of only %.1f%% of upright validation X-rays: not used "
                    "(X-rays are scored as given)", 100 * upright)
    return (confidence if used else None), {"confidence": confidence, "used": used,
                                            "val_upright_recognised": round(upright, 4)}


def run(seed: int, params: OodParams) -> dict[str, Any]:
    keras_model = keras.models.load_model(MODEL_FILE, compile=False, safe_mode=True)
    calibrated = ServingArtefact.from_file(CALIBRATED_FILE).decision
    gate, limit, report = evaluate_gate(seed, params, keras_model)
    confidence, report["orientation"] = orientation_check(keras_model, params.orientation_confidence)
    decision = replace(calibrated, orientation_confidence=confidence,
                       ood={"score": report["chosen"], "limit": round(limit, 6), "accept_rate": params.accept_rate,
                            "fitted_on": "train", "limit_from": "val"})
    serving = artefact.build(keras_model, decision, gate)
    report["served"] = served_outcomes(serving, seed)
    ARTEFACT_FILE.write_bytes(serving)
    write_json(OOD_FILE, report)
    return report


def main() -> None:
    setup_logging()
    with stage_errors(log):
        report = run(*stage_params("ood"))
    log.info("gate %s, limit %.4g: X-rays accepted %s; outliers diagnosed %s; AUROC %s", report["chosen"],
             report["limit"], report["x_rays_accepted"], report["diagnosed_rate"], report["auroc"])


if __name__ == "__main__":
    main()
