"""Stage: register the serving artefact as a new version of the MLflow model; move the `production` alias
to it only when it is at least as good as the current production version on the same images, today.

The registered model is a pyfunc around the ONNX artefact (`scoring.pyfunc`), with the registry name and
version stamped into the artefact's decision; the Keras model stays logged in the same run for
retraining. The deciding metric is `register.promotion_metric`, scored on the external set when there is
one, else on validation (choosing between models is selection: never on the carved test split). The
decision is kept as version tags, in the version's description and in `models/registration.json`; the
next stage (`pipeline.bundle`) exports the registered version to `models/registered/`. This stage and the
logged model depend on the scoring core only (`scoring/`), never on a client of it.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline.arrays import has_split, load_split
from pipeline.common import git_commit, read_json, setup_logging, stage_errors, write_json
from pipeline.metrics import point_metrics
from pipeline.params import RegisterParams, stage_params
from pipeline.paths import ARTEFACT_FILE, REGISTRY_FILE, ROBUSTNESS_FILE, RUN_FILE
from pipeline.registry import MODEL_NAME, PRODUCTION_ALIAS, TrackingUnavailableError, configure_tracking
from scoring import decision as decision_store
from scoring.pyfunc import ARTEFACT_KEY, SIGNATURE
from scoring.runtime import ServingArtefact
from scoring.store import ARTEFACT_NAME, ModelUnavailableError, load_artefact

log = logging.getLogger(__name__)

SERVING_MODEL_NAME = "serving-model"
# The pyfunc is logged as code, not as a pickled object: loading it runs no stored bytes.
CORE_PACKAGE = Path("scoring")
PYFUNC_CODE = CORE_PACKAGE / "pyfunc_model.py"
EXAMPLE_IMAGE = Path("examples") / "normal_IM-0115-0001.png"


def promotion_split() -> str:
    return "external" if has_split("external") else "val"


def score(model: ServingArtefact, split: str, metric: str) -> float:
    data = load_split(split)
    return float(point_metrics(data.labels, model.probabilities(data.images), model.decision.threshold)[metric])


def production_score(client: MlflowClient, split: str, metric: str) -> tuple[str | None, float | None]:
    """(version, metric on today's `split`) of the current production model, or (None, None)."""
    try:
        version = client.get_model_version_by_alias(MODEL_NAME, PRODUCTION_ALIAS)
    except MlflowException:
        return None, None
    try:
        model = load_artefact(f"models:/{MODEL_NAME}/{version.version}")
    except ModelUnavailableError as error:
        log.warning("production version %s cannot be loaded (%s): it will be replaced", version.version, error)
        return version.version, None
    return version.version, score(model, split, metric)


def next_version(client: MlflowClient) -> str:
    """The number the registry will give the next version (it counts up from 1), so that the artefact can
    carry it before it is logged; checked after registration."""
    try:
        versions = client.search_model_versions(f"name='{MODEL_NAME}'")
    except MlflowException:
        return "1"
    return str(max((int(v.version) for v in versions), default=0) + 1)


def core_modules(entry: Path = PYFUNC_CODE) -> list[Path]:
    """The scoring core's modules the pyfunc needs: `entry` and what it imports, transitively. The
    logged model carries only these (the scoring core), never the app's or the browser page's modules."""
    import ast

    needed, queue = set(), [entry]
    while queue:
        module = queue.pop()
        if module in needed:
            continue
        needed.add(module)
        for node in ast.walk(ast.parse(module.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == CORE_PACKAGE.name:
                names = [node.module.split(".", 1)[1]] if "." in node.module else [a.name for a in node.names]
                queue += [CORE_PACKAGE / f"{name}.py" for name in names if (CORE_PACKAGE / f"{name}.py").is_file()]
    return sorted(needed | {CORE_PACKAGE / "__init__.py"})


def log_serving_model(run_id: str, artefact_path: Path) -> str:
    """The pyfunc around the artefact, logged in the training run; returns its model URI."""
    import numpy
    import onnxruntime
    import PIL
    import pydicom

    example = pd.DataFrame({"image": [EXAMPLE_IMAGE.read_bytes()]})
    with mlflow.start_run(run_id=run_id), tempfile.TemporaryDirectory() as scratch:
        package = Path(scratch) / CORE_PACKAGE.name
        package.mkdir()
        for module in core_modules():
            shutil.copy2(module, package / module.name)
        info = mlflow.pyfunc.log_model(
            name=SERVING_MODEL_NAME, python_model=str(PYFUNC_CODE), artifacts={ARTEFACT_KEY: str(artefact_path)},
            code_paths=[str(package)], signature=SIGNATURE, input_example=example,
            pip_requirements=[f"mlflow=={mlflow.__version__}", f"onnxruntime=={onnxruntime.__version__}",
                              f"numpy=={numpy.__version__}", f"pillow=={PIL.__version__}",
                              f"pydicom=={pydicom.__version__}", f"pandas=={pd.__version__}"],
        )
    return info.model_uri


def served_robustness() -> dict[str, Any]:
    """What the robustness stage measured through the serving path (turned, mirrored, noisy copies), for the
    model card; empty when it did not run."""
    return read_json(ROBUSTNESS_FILE).get("served", {}) if ROBUSTNESS_FILE.is_file() else {}


def register(params: RegisterParams) -> dict[str, Any]:
    configure_tracking()
    client = MlflowClient()
    metric, split = params.promotion_metric, promotion_split()
    run = read_json(RUN_FILE)
    new_model = ServingArtefact.from_file(ARTEFACT_FILE)
    previous_version, previous_score = production_score(client, split, metric)
    new_score = score(new_model, split, metric)
    expected = next_version(client)
    decision = replace(new_model.decision.registered(MODEL_NAME, expected), robustness=served_robustness())
    with tempfile.TemporaryDirectory() as scratch:
        staged = Path(scratch) / ARTEFACT_NAME
        staged.write_bytes(decision_store.write(ARTEFACT_FILE.read_bytes(), decision))
        model_uri = log_serving_model(run["run_id"], staged)
        version = mlflow.register_model(model_uri, MODEL_NAME, tags={
            "git_commit": decision.training_commit, "data_digest": str(decision.data_digest),
            "keras_model": run["model_uri"], "threshold": f"{decision.threshold:.6f}"})
        if str(version.version) != expected:  # someone registered a version at the same moment
            client.delete_model_version(MODEL_NAME, version.version)
            raise ModelUnavailableError(f"the registry gave version {version.version}, not {expected}: "
                                        "another registration ran at the same time; run the stage again")
    promote = at_least_as_good(new_score, previous_score)
    reason = _reason(promote, f"{split} {metric}", new_score, previous_version, previous_score)
    client.update_model_version(MODEL_NAME, version.version, description=_description(decision, reason))
    client.set_model_version_tag(MODEL_NAME, version.version, "promotion_decision", reason)
    if promote:
        client.set_registered_model_alias(MODEL_NAME, PRODUCTION_ALIAS, version.version)
    record = {
        "model_name": MODEL_NAME, "version": version.version, "promoted": promote, "reason": reason,
        "metric": metric, "split": split, "score": round(new_score, 4),
        "previous_production_version": previous_version,
        "previous_production_score": None if previous_score is None else round(previous_score, 4),
        "registered_by_commit": git_commit(),
    }
    write_json(REGISTRY_FILE, record)
    return record


def at_least_as_good(new: float, production: float | None) -> bool:
    """Promote when there is no production score, or the new one is at least as high at the 4 decimals
    both are reported with (the same model scored twice must be promoted, whichever way it rounds)."""
    return production is None or round(new, 4) >= round(production, 4)


def _reason(promote: bool, metric: str, new: float, old_version: str | None, old: float | None) -> str:
    if old_version is None:
        return f"promoted: first production version ({metric} {new:.4f})"
    if old is None:
        return f"promoted: production version {old_version} could not be loaded"
    verdict = "promoted" if promote else f"kept version {old_version}"
    return f"{verdict}: {metric} {new:.4f} vs production v{old_version} {old:.4f} on the same images"


def _description(decision: decision_store.Decision, reason: str) -> str:
    parts = []
    for split, metrics in decision.metrics.items():
        auc = metrics.get("roc_auc", {})
        parts.append(f"{split} ROC-AUC {auc.get('value')} [{auc.get('ci_low')}, {auc.get('ci_high')}]")
    return (f"CNN trained from scratch on Kermany et al. 2018 (CC BY 4.0). Commit {decision.training_commit}. "
            f"Threshold {decision.threshold:.4f} ({decision.threshold_rule}, fitted on "
            f"{decision.calibration.get('fitted_on')}). {'; '.join(parts)}. {reason}.")


def main() -> None:
    setup_logging()
    with stage_errors(log, TrackingUnavailableError, ModelUnavailableError):
        record = register(stage_params("register")[1])
    log.info("registered %s version %s: %s", record["model_name"], record["version"], record["reason"])


if __name__ == "__main__":
    main()
