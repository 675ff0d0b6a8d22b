"""The decision a model makes, kept in one place: the serving artefact's ONNX metadata.

Evaluation writes it (threshold and the rule that chose it, calibration, metrics), registration adds the
registry name and version, and every way of serving (app, predict CLI, MLflow pyfunc, Spark, browser)
reads it back from the artefact through this module. Nothing else stores a threshold.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

FORMAT = 2
METADATA_KEY = "pneumonia_screening.decision"
CLASS_NAMES = ("NORMAL", "PNEUMONIA")
SUBTYPE_NAMES = ("BACTERIAL", "VIRAL")
REVIEW = "REVIEW"
# The artefact's tensors, also read by the browser page.
INPUT_NAME = "pixels"
PROBABILITY_OUTPUT = "probability"
CAM_OUTPUT = "cam"
OOD_OUTPUT = "ood_score"
VIRAL_OUTPUT = "probability_viral"
ORIENTATION_OUTPUT = "orientation"


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
    # The sensitivity the threshold rule aimed at (the sensitivity rules), or None.
    target_sensitivity: float | None = None
    # The central fraction of the image side the network sees; the CAM covers that region only.
    crop: float = 1.0
    class_names: tuple[str, str] = CLASS_NAMES
    model_name: str = "unregistered"
    model_version: str | None = None
    training_commit: str = "unknown"
    trained_at: str | None = None
    run_id: str | None = None
    data_digest: str | None = None
    # The network and where its starting weights came from (backbone, initial_weights, image_size, parameters).
    network: dict[str, Any] = field(default_factory=dict)
    # split -> metric -> {"value", "ci_low", "ci_high"}; split -> image count.
    metrics: dict[str, dict[str, dict[str, float | None]]] = field(default_factory=dict)
    images: dict[str, int] = field(default_factory=dict)
    # The same for bacterial/viral among the pneumonia images of known kind (split -> metric -> values),
    # triage figures (split -> review_share, decided_accuracy...), and the share called pneumonia per
    # subgroup (split -> group -> {"images", "called_pneumonia"}).
    subtype_metrics: dict[str, dict[str, dict[str, float | None]]] = field(default_factory=dict)
    triage_metrics: dict[str, dict[str, float | None]] = field(default_factory=dict)
    subgroups: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    # What the serving path does with turned, mirrored and noisy copies (pipeline.robustness, `served`).
    robustness: dict[str, Any] = field(default_factory=dict)
    # The out-of-distribution gate: score name and the limit above which an image is refused.
    ood: dict[str, Any] = field(default_factory=dict)
    # A pneumonia is called VIRAL when its calibrated probability of being viral reaches this.
    subtype_threshold: float = 0.5
    # What calibrated the viral output (folded into the graph, as for `calibration`).
    subtype_calibration: dict[str, Any] = field(default_factory=dict)
    # Triage: NORMAL below `normal_below`, PNEUMONIA from `pneumonia_from`, REVIEW between; with the rule and
    # targets that fitted them. Empty: no triage (every scored X-ray is triaged by its label).
    triage: dict[str, Any] = field(default_factory=dict)
    # An X-ray is turned back upright when the orientation output gives its orientation at least this.
    # None: the orientation output is not used (a network that has not learnt it); images are scored as given.
    orientation_confidence: float | None = 0.9
    format: int = FORMAT

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise DecisionError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.input_size < 8:
            raise DecisionError(f"input size {self.input_size} is too small")
        if not 0.5 <= self.crop <= 1.0:
            raise DecisionError(f"crop must be in [0.5, 1], got {self.crop}")
        if not 0.0 <= self.subtype_threshold <= 1.0:
            raise DecisionError(f"subtype threshold must be in [0, 1], got {self.subtype_threshold}")
        if self.orientation_confidence is not None and not 0.5 < self.orientation_confidence <= 1.0:
            raise DecisionError(f"orientation confidence must be in (0.5, 1], got {self.orientation_confidence}")
        if self.triage and not (self.triage["normal_below"] <= self.threshold <= self.triage["pneumonia_from"]):
            raise DecisionError("the triage band must contain the threshold: "
                                f"{self.triage['normal_below']} <= {self.threshold} <= {self.triage['pneumonia_from']}")

    def label(self, probability: float) -> str:
        return self.class_names[int(probability >= self.threshold)]

    def triaged(self, probability: float) -> str:
        """NORMAL, PNEUMONIA, or REVIEW for the uncertain middle (the label itself when there is no triage)."""
        if not self.triage:
            return self.label(probability)
        if probability < self.triage["normal_below"]:
            return self.class_names[0]
        if probability >= self.triage["pneumonia_from"]:
            return self.class_names[1]
        return REVIEW

    def orientation(self, probabilities) -> int | None:
        """The orientation (index into `scoring.orientation.ORIENTATIONS`) the orientation output gives with
        at least `orientation_confidence`, or None when it is not that sure which way up the X-ray is.

        The turn must be sure on its own (its probability summed over mirrored and not); mirroring is taken
        only when it too is that sure, given the turn: the diagnosis is the same either way (the graph
        averages an image and its mirror), so an unsure mirror is no reason to refuse. Upright, always, when
        the orientation output is not used (`orientation_confidence` None)."""
        if self.orientation_confidence is None:
            return 0
        turns = len(probabilities) // 2
        by_turn = [float(probabilities[k]) + float(probabilities[k + turns]) for k in range(turns)]
        turn = max(range(turns), key=by_turn.__getitem__)
        if by_turn[turn] < self.orientation_confidence:
            return None
        mirrored = float(probabilities[turn + turns]) >= self.orientation_confidence * by_turn[turn]
        return turn + turns * mirrored

    def subtype(self, probability: float, probability_viral: float) -> str | None:
        """BACTERIAL or VIRAL for an X-ray labelled PNEUMONIA, else None."""
        if self.label(probability) != self.class_names[1]:
            return None
        return SUBTYPE_NAMES[int(probability_viral >= self.subtype_threshold)]

    @property
    def ood_limit(self) -> float | None:
        """Images whose out-of-distribution score is above this are refused (None: no gate)."""
        return float(self.ood["limit"]) if self.ood else None

    def refusal(self, ood_score: float) -> str | None:
        """The message for an image the gate refuses, or None when it passes (or there is no gate)."""
        limit = self.ood_limit
        if limit is None or ood_score <= limit:
            return None
        return ("not recognised as a frontal paediatric chest X-ray: not scored. Send the frontal (AP/PA) "
                "view of a child's chest, as exported by the X-ray system")

    @staticmethod
    def orientation_unclear() -> str:
        return ("could not tell which way up this X-ray is: not scored. Send it as the X-ray system exports it, "
                "the patient's head at the top")

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
