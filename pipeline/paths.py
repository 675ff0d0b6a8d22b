"""Every file and folder the pipeline reads or writes, relative to the project root (where DVC runs each
stage). `dvc.yaml` names the same paths as each stage's deps and outs; `tests/test_stages.py` keeps the two
in step."""

from __future__ import annotations

from pathlib import Path

from scoring import locations

PARAMS_FILE = Path(locations.PARAMS_FILE)

# Local archives that replace the URLs in params.yaml (`make repro DATA=... EXTERNAL=...` links them here);
# DVC tracks this folder as the download stage's dependency, so a new archive reruns the pipeline.
SOURCES_DIR = Path("data/sources")
TRAIN_SOURCE = SOURCES_DIR / "train"
EXTERNAL_SOURCE = SOURCES_DIR / "external"

DOWNLOAD_DIR = Path("data/downloads")  # under the persistent root: outlives DVC's temporary workspaces
RAW_DIR = Path("data/raw")
RAW_TRAIN_DIR = RAW_DIR / "archive"
RAW_EXTERNAL_DIR = RAW_DIR / "external"

PREPARED_DIR = Path("data/prepared")
MANIFEST_FILE = PREPARED_DIR / "manifest.csv"

MODEL_DIR = Path("models")
MODEL_FILE = MODEL_DIR / "model.keras"
RUN_FILE = MODEL_DIR / "train_run.json"
# What the stages fit, each in its own file: the decision (threshold, calibration, triage; evaluate stage)
# and the input gate with the orientation rule (ood stage). The assemble stage puts them and the network
# into the serving artefact: one ONNX graph, calibration folded in, the decision in its metadata.
DECISION_FILE = MODEL_DIR / "decision.json"
GATE_FILE = MODEL_DIR / "gate.npz"
ARTEFACT_FILE = MODEL_DIR / "serving.onnx"

REPORTS_DIR = Path("reports")
DATA_SUMMARY_FILE = REPORTS_DIR / "data_summary.json"
HISTORY_FILE = REPORTS_DIR / "train_history.csv"
TRAIN_SUMMARY_FILE = REPORTS_DIR / "train_summary.json"
METRICS_FILE = REPORTS_DIR / "metrics.json"  # headline figures only: what `dvc metrics show` prints
EVALUATION_FILE = REPORTS_DIR / "evaluation.json"  # every metric with its CI, per split
PLOTS_DIR = REPORTS_DIR / "plots"
FIGURES_DIR = REPORTS_DIR / "figures"
ROBUSTNESS_FILE = REPORTS_DIR / "robustness.json"
ROBUSTNESS_FIGURE = REPORTS_DIR / "robustness.png"
OOD_FILE = REPORTS_DIR / "ood.json"
SERVING_REPORT_FILE = REPORTS_DIR / "serving.json"  # the assembled artefact: its size and what it does with outliers
REGISTRY_FILE = MODEL_DIR / "registration.json"
# The registered artefact as an export folder (model.onnx, MODEL_CARD.md): `dvc pull` brings it anywhere.
REGISTERED_DIR = MODEL_DIR / "registered"


def split_file(split: str) -> Path:
    """The prepared arrays of one split: train, val, test (carved from the training data) or external."""
    return PREPARED_DIR / f"{split}.npz"
