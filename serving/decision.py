"""The decision a model makes, kept in one place: the serving artefact's ONNX metadata.

Evaluation writes it (threshold and the rule that chose it, calibration, metrics), registration adds the
registry name and version, and every way of serving (app, predict CLI, MLflow pyfunc, Spark, browser)
reads it back from the artefact through this module. Nothing else stores a threshold.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

FORMAT = 1
METADATA_KEY = "pneumonia_screening.decision"
CLASS_NAMES = ("NORMAL", "PNEUMONIA")
# The artefact's tensors, also read by the browser page.
INPUT_NAME = "pixels"
PROBABILITY_OUTPUT = "probability"
CAM_OUTPUT = "cam"
OOD_OUTPUT = "ood_score"


class DecisionError(ValueError):
    """An artefact without usable decision metadata."""


@dataclass(frozen=True)
class Decision:
    """What turns the artefact's calibrated probability into a label, and what the model card shows.

    `calibration` is already folded into the graph (its output is the calibrated probability); it is
    recorded here only to say what was fitted, and on which split.
    """

    threshold: float
    threshold_rule: str
    input_size: int
    calibration: dict[str, Any] = field(default_factory=dict)
    # The central fraction of the image side the network sees; the CAM covers that region only.
    crop: float = 1.0
    class_names: tuple[str, str] = CLASS_NAMES
    model_name: str = "unregistered"
    model_version: str | None = None
    training_commit: str = "unknown"
    trained_at: str | None = None
    run_id: str | None = None
    data_digest: str | None = None
    # split -> metric -> {"value", "ci_low", "ci_high"}; split -> image count.
    metrics: dict[str, dict[str, dict[str, float | None]]] = field(default_factory=dict)
    images: dict[str, int] = field(default_factory=dict)
    # The out-of-distribution gate: score name and the limit above which an image is refused.
    ood: dict[str, Any] = field(default_factory=dict)
    format: int = FORMAT

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise DecisionError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.input_size < 8:
            raise DecisionError(f"input size {self.input_size} is too small")
        if not 0.5 <= self.crop <= 1.0:
            raise DecisionError(f"crop must be in [0.5, 1], got {self.crop}")

    def label(self, probability: float) -> str:
        return self.class_names[int(probability >= self.threshold)]

    @property
    def ood_limit(self) -> float | None:
        """Images whose out-of-distribution score is above this are refused (None: no gate)."""
        return float(self.ood["limit"]) if self.ood else None

    def refusal(self, ood_score: float) -> str | None:
        """The message for an image the gate refuses, or None when it passes (or there is no gate)."""
        limit = self.ood_limit
        if limit is None or ood_score <= limit:
            return None
        return (f"not recognised as a frontal paediatric chest X-ray (score {ood_score:.3g}, limit {limit:.3g}): "
                "not scored")

    def registered(self, name: str, version: str) -> Decision:
        return replace(self, model_name=name, model_version=str(version))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Decision:
        try:
            values = json.loads(text)
            if values.get("format") != FORMAT:
                raise DecisionError(f"decision format {values.get('format')} is not {FORMAT}: re-export the model")
            values["class_names"] = tuple(values["class_names"])
            return cls(**values)
        except DecisionError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise DecisionError(f"decision metadata is unreadable: {error}") from error


def read(metadata: dict[str, str]) -> Decision:
    """The decision in an ONNX model's metadata (`InferenceSession.get_modelmeta().custom_metadata_map`)."""
    if METADATA_KEY not in metadata:
        raise DecisionError("the ONNX model carries no decision metadata: it is not a serving artefact")
    return Decision.from_json(metadata[METADATA_KEY])


def write(onnx_model: bytes, decision: Decision) -> bytes:
    """`onnx_model` with `decision` in its metadata (any earlier decision replaced). Training side only:
    it needs the `onnx` package, which serving does not."""
    import onnx

    proto = onnx.load_from_string(onnx_model)
    kept = [prop for prop in proto.metadata_props if prop.key != METADATA_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, decision.to_json()
    return proto.SerializeToString()
