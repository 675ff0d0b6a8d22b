"""Stage: the input gate. Is it a chest X-ray? Fit the gate and other candidate out-of-distribution scores,
and measure them side by side; decide whether the orientation output is used.

- Candidates, all computed from what the network already sees:
  - `mahalanobis`: squared Mahalanobis distance (per feature) of globally pooled block outputs to the nearer
    class mean, tied covariance, fitted on the training images (Lee et al. 2018), on the last stage alone
    or summed over the last `ood.blocks` stages (as FRODO, Cao et al., MIDL 2019, sums layers);
  - `energy`: the free energy of the two-class logit, -log(1 + e^z) (Liu et al. 2020);
  - `pca`: reconstruction error of the 32 x 32 image by the training images' leading principal components
    (a linear autoencoder).
- The limit is set on X-rays only: the `ood.accept_rate` quantile of the validation images' scores.
- Outlier sets come from what installed packages ship (`pipeline.outliers`). AUROCs are reported on the
  `tune` outliers (synthetic and scikit-learn) apart from the other far ones and the near ones.
- The gate is not chosen here: it is always `mahalanobis` summed over the last `ood.blocks` stages
  (`CHOSEN`); the other candidates are measured beside it, for comparison only.
- Every outlier goes through the serving path's decoding and plausibility checks first: "diagnosed" is
  what would really get a label.

Outputs: `models/gate.npz` (the gate's class means and precision factors, with its rule: the limit and the
orientation confidence, which the assemble stage writes into the decision) and `reports/ood.json`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
from sklearn.metrics import roc_auc_score

from pipeline import artefact
from pipeline.arrays import has_split, load_split
from pipeline.common import setup_logging, stage_errors, write_json
from pipeline.model import model_parts
from pipeline.outliers import decode_for_gate, outlier_sets, rate
from pipeline.params import OodParams, stage_params
from pipeline.paths import GATE_FILE, MODEL_FILE, OOD_FILE
from scoring.imaging import resize_grey

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


# --------------------------------------------------------------------------------------------------
# Measuring


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
        return {CHOSEN: gate.score(features.pooled), "mahalanobis, last stage only": last_block.score(features.pooled[-1:]),
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
        "diagnosed_rate": {kind: rate([o.name in diagnosed for o in outliers if o.kind == kind])
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
            "diagnosed_rate": rate([outlier.name in diagnosed for outlier in members]),
            "auroc_vs_x_rays": {name: auroc(all_xrays[name], values[mask]) for name, values in scores.items()},
        }
    return gate, limit, report


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
    gate, limit, report = evaluate_gate(seed, params, keras_model)
    confidence, report["orientation"] = orientation_check(keras_model, params.orientation_confidence)
    rule = {"ood": {"score": report["chosen"], "limit": round(limit, 6), "accept_rate": params.accept_rate,
                    "fitted_on": "train", "limit_from": "val"},
            "orientation_confidence": confidence}
    gate.write(GATE_FILE, rule)
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
