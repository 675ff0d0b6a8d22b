"""The registered MLflow model: a pyfunc around the serving artefact (as MLflow's flower_classifier does).

Input: a DataFrame with a column `image` holding the raw bytes of image files (PNG, JPEG, DICOM...;
base64 in the JSON of `mlflow models serve`). Output: one row per image with the prediction record
(`scoring.runtime.RECORD_FIELDS`: probability of pneumonia, label, error, triage, subtype, probability
that it is viral, note) and the `threshold`, exactly what the app and the predict CLI say for the same
file, because all of them run `scoring.runtime.Predictor` on the same artefact.
"""

from __future__ import annotations

import mlflow.pyfunc
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from scoring.runtime import RECORD_FIELDS, RECORD_TYPES, Predictor, ServingArtefact

ARTEFACT_KEY = "serving_model"
INPUT_COLUMN = "image"
OUTPUT_COLUMNS = [*RECORD_FIELDS, "threshold"]

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("binary", INPUT_COLUMN)]),
    outputs=Schema([*(ColSpec(RECORD_TYPES[name], name, required=False) for name in RECORD_FIELDS),
                    ColSpec("double", "threshold")]),
)


class ScreeningModel(mlflow.pyfunc.PythonModel):
    """Loads the ONNX artefact once per process; `predict` never raises for a bad image."""

    def load_context(self, context) -> None:
        self.predictor = Predictor(ServingArtefact.from_file(context.artifacts[ARTEFACT_KEY]))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return predictions_frame(self.predictor, model_input)


def predictions_frame(predictor: Predictor, model_input: pd.DataFrame) -> pd.DataFrame:
    if INPUT_COLUMN not in model_input.columns:
        raise ValueError(f"expected a column '{INPUT_COLUMN}' with the bytes of image files")
    items = [(str(index), _as_bytes(value)) for index, value in enumerate(model_input[INPUT_COLUMN])]
    rows = [{**p.record(), "threshold": p.threshold} for p in predictor.predict(items)]
    # Object columns keep a missing value as None (null in the scoring server's JSON), not NaN.
    return pd.DataFrame(rows, columns=OUTPUT_COLUMNS, dtype=object)


def _as_bytes(value) -> bytes | None:
    """Bytes as given; None or NaN (a missing cell) as no data, which the predictor reports."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return None
