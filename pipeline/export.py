"""Export a registered model to a self-contained folder: `python -m pipeline.export DEST [--model-uri URI]`.

The folder holds `model.keras` (Keras native format, loadable with `safe_mode=True`), its ONNX twin
`model.onnx` (what serving runs; checked against Keras on load), `bundle.json`
(threshold, model card, input size, source URI) and `MODEL_CARD.md`. MLflow stores artefact paths as
absolute paths, so anything meant to travel (a Space, a container, another machine) needs this
folder rather than a registry URI; `load_serving_model(DEST)` and `app.py --model-uri DEST` read it.

Exit status: 0 exported; 2 no usable model, or DEST exists and is not an earlier export.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.common import setup_logging, write_json
from pipeline.registry import (
    BUNDLE_FILE,
    BUNDLE_MODEL,
    BUNDLE_ONNX,
    ModelUnavailableError,
    ServingModel,
    TrackingUnavailableError,
    load_serving_model,
    production_uri,
)
from pipeline.serving import convert_to_onnx

log = logging.getLogger(__name__)

CARD_FILE = "MODEL_CARD.md"
BUNDLE_FORMAT = 1
# Tolerance for the reloaded model's outputs against the original's on the same probe images.
RELOAD_ATOL = 1e-5

DATA_SOURCE = (
    "Kermany D., Zhang K., Goldbaum M. (2018), *Labeled Optical Coherence Tomography (OCT) and Chest X-Ray "
    "Images for Classification*, Mendeley Data v2, doi:10.17632/rscbjbr9sj.2, CC BY 4.0: paediatric "
    "chest X-rays (children aged 1 to 5, anterior-posterior views, one centre in Guangzhou)."
)
INTENDED_USE = (
    "Research and teaching: showing how a screening model trained on this public dataset behaves. "
    "Scores mean little for adults, lateral views, other hospitals' equipment or anything that is not "
    "a paediatric chest X-ray."
)
NOT_A_DEVICE = (
    "**Not a medical device.** Not for diagnosis, triage or any clinical decision; it has not been "
    "clinically validated."
)
METRIC_NAMES = {
    "roc_auc": "ROC-AUC", "pr_auc": "PR-AUC", "accuracy": "accuracy", "sensitivity": "sensitivity",
    "specificity": "specificity", "precision": "precision", "f1": "F1", "brier": "Brier score",
    "ece": "expected calibration error",
}


class ExportError(RuntimeError):
    """The destination cannot be written safely."""


def export(model_uri: str, dest: Path, force: bool = False) -> Path:
    """Write the bundle for `model_uri` to `dest` (written beside it first, then renamed into place)."""
    dest = Path(dest).absolute()
    _check_destination(dest, force)
    serving = load_serving_model(model_uri)
    card = dict(serving.card)
    staging = dest.with_name(dest.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        serving.keras_model.save(staging / BUNDLE_MODEL)
        _check_reload(serving, staging / BUNDLE_MODEL)
        onnx_model = serving.onnx_model or convert_to_onnx(serving.keras_model)
        if onnx_model is not None:  # optional: without it the app converts at start-up
            (staging / BUNDLE_ONNX).write_bytes(onnx_model)
        write_json(staging / BUNDLE_FILE, {
            "format": BUNDLE_FORMAT,
            "threshold": float(serving.threshold),
            "temperature": float(serving.temperature),
            "calibration_bias": float(serving.calibration_bias),
            "card": card,
            "input_size": serving.input_size,
            "exported_from": model_uri,
            "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        })
        (staging / CARD_FILE).write_text(card_markdown(card, serving.threshold, title=True) + "\n",
                                         encoding="utf-8")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if dest.exists():
        shutil.rmtree(dest)  # empty or an earlier export: _check_destination refused anything else
    staging.rename(dest)
    return dest


def _check_destination(dest: Path, force: bool) -> None:
    if not dest.exists():
        return
    if not dest.is_dir():
        raise ExportError(f"{dest} exists and is not a folder")
    if not any(dest.iterdir()):
        return
    if not (dest / BUNDLE_FILE).is_file():
        raise ExportError(f"{dest} exists and is not an exported model: choose an empty or new folder")
    if not force:
        raise ExportError(f"{dest} already holds an exported model: pass --force to replace it")


def _check_reload(serving: ServingModel, path: Path) -> None:
    """The saved file must load in safe mode and score exactly like the model it came from."""
    import keras

    reloaded = keras.models.load_model(path, compile=False, safe_mode=True)
    size = serving.input_size
    probes = np.random.default_rng(0).uniform(0, 255, (2, size, size, 1)).astype(np.float32)
    expected = np.asarray(serving.keras_model(probes, training=False))
    actual = np.asarray(reloaded(probes, training=False))
    if not np.allclose(expected, actual, atol=RELOAD_ATOL):
        raise ExportError(f"the exported model scores differently from {serving.uri} "
                          f"(max difference {np.abs(expected - actual).max():.2e})")


def card_markdown(card: dict[str, Any], threshold: float, title: bool = False) -> str:
    """The model card as Markdown: provenance, threshold, test metrics with CIs, data and intended use.

    Shared by MODEL_CARD.md and the app's model panel, so both always say the same thing.
    """
    name = card.get("registered_name", "unregistered model")
    version = card.get("version")
    heading = f"{name} version {version}" if version is not None else str(name)
    lines = [f"# Model card: {heading}", ""] if title else [f"**Model:** {heading}", ""]
    lines += [
        f"- **Trained:** {_trained_at(card.get('trained_at'))}, from commit `{card.get('git_commit', 'unknown')}`",
        f"- **Training run:** `{card.get('run_id', 'unknown')}`; data digest `{card.get('data_digest', 'unknown')}`",
        f"- **Decision threshold:** {threshold:.4f}"
        + (f" (rule: {card['threshold_rule']}, chosen on the validation split)" if card.get("threshold_rule")
           else ""),
        "",
    ]
    lines += _metrics_table(card.get("test_metrics") or {}, card.get("test_images"))
    lines += [
        f"**Training data:** {DATA_SOURCE}",
        "",
        f"**Intended use:** {INTENDED_USE}",
        "",
        NOT_A_DEVICE,
    ]
    return "\n".join(lines)


def _metrics_table(metrics: dict[str, Any], images: Any) -> list[str]:
    if not metrics:
        return ["*No test metrics were recorded with this model.*", ""]
    heading = f"**Test metrics** ({images} held-out images, 95% bootstrap CI):" if images else "**Test metrics:**"
    rows = [heading, "", "| metric | value | 95% CI |", "| --- | --- | --- |"]
    for key, values in metrics.items():
        values = values if isinstance(values, dict) else {"value": values}
        rows.append(f"| {METRIC_NAMES.get(key, key)} | {_number(values.get('value'))} | "
                    f"{_number(values.get('ci_low'))} to {_number(values.get('ci_high'))} |")
    return rows + [""]


def _number(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.3f}"


def _trained_at(value: Any) -> str:
    """MLflow start times are milliseconds since the epoch."""
    try:
        moment = datetime.fromtimestamp(float(value) / 1000.0, tz=UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        return "unknown date"
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("dest", type=Path, help="folder to write (new, empty, or an earlier export with --force)")
    parser.add_argument("--model-uri", default=None,
                        help="models:/NAME@ALIAS, models:/NAME/VERSION or an exported folder "
                             "(default: the production alias in the project's MLflow store)")
    parser.add_argument("--force", action="store_true", help="replace an earlier export at DEST")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    uri = args.model_uri or production_uri()
    try:
        dest = export(uri, args.dest, force=args.force)
    except (ModelUnavailableError, TrackingUnavailableError, ExportError) as error:
        log.error("%s", error)
        return 2
    log.info("exported %s to %s", uri, dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
