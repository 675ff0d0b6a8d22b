"""Stage: assemble the serving artefact from what the stages before fitted, and say what it does.

In: the trained network (`models/model.keras`), the decision (`models/decision.json`: threshold,
calibration, triage; evaluate stage) and the input gate with its rule (`models/gate.npz`: the limit and the
orientation confidence; ood stage). Out: `models/serving.onnx`, the one ONNX graph every way of serving
runs (`pipeline.artefact`, checked there against TensorFlow), and `reports/serving.json`: its size and what
its whole serving path (decoding, checks, orientation, gate) does with every outlier set of `pipeline.ood`,
the share given a diagnosis being what a user would see.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import replace
from typing import Any

from pipeline import artefact
from pipeline.arrays import load_split
from pipeline.common import setup_logging, stage_errors, write_atomically, write_json
from pipeline.outliers import outlier_sets, rate
from pipeline.params import stage_params
from pipeline.paths import ARTEFACT_FILE, DECISION_FILE, GATE_FILE, MODEL_FILE, SERVING_REPORT_FILE
from scoring.decision import Decision
from scoring.runtime import Predictor, ServingArtefact

log = logging.getLogger(__name__)


def assembled_decision(decision: Decision, rule: dict[str, Any]) -> Decision:
    """The evaluate stage's decision with the gate's rule (its limit, and the orientation confidence)."""
    return replace(decision, ood=rule["ood"], orientation_confidence=rule["orientation_confidence"])


def served_outcomes(serving: ServingArtefact, seed: int) -> dict[str, Any]:
    """What the artefact's serving path (checks, orientation, gate) does with every outlier: the share given a
    diagnosis, by kind and by source (`reports/ood.json` compares the gate's candidates on their scores alone)."""
    outliers = outlier_sets(seed, load_split("val").images)
    results = Predictor(serving).predict((outlier.name, outlier.data) for outlier in outliers)
    diagnosed = {result.name for result in results if result.scored}
    return {"diagnosed_rate": {kind: rate([o.name in diagnosed for o in outliers if o.kind == kind])
                               for kind in ("far", "near")},
            "diagnosed_by_source": {source: rate([o.name in diagnosed for o in outliers if o.source == source])
                                    for source in sorted({outlier.source for outlier in outliers})}}


def run(seed: int) -> dict[str, Any]:
    import keras  # here: the functions above need no TensorFlow

    keras_model = keras.models.load_model(MODEL_FILE, compile=False, safe_mode=True)
    gate, rule = artefact.Gate.read(GATE_FILE)
    decision = assembled_decision(Decision.from_json(DECISION_FILE.read_text(encoding="utf-8")), rule)
    serving = artefact.build(keras_model, decision, gate)
    write_atomically(ARTEFACT_FILE, serving)
    report = {"bytes": len(serving), "sha256": hashlib.sha256(serving).hexdigest(),
              "gate": rule["ood"]["score"], "orientation_confidence": rule["orientation_confidence"],
              "served": served_outcomes(ServingArtefact(serving, str(ARTEFACT_FILE)), seed)}
    write_json(SERVING_REPORT_FILE, report)
    return report


def main() -> None:
    setup_logging()
    with stage_errors(log):
        report = run(stage_params("ood")[0])
    log.info("serving artefact: %.1f MB; outliers diagnosed %s", report["bytes"] / 1e6,
             report["served"]["diagnosed_rate"])


if __name__ == "__main__":
    main()
