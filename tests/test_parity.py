"""Every way of serving the registered model gives the same answer: the app (through gradio_client), the
predict CLI, `mlflow.pyfunc.load_model` and the `mlflow models serve` endpoint, on the same files.

The model is the tiny artefact registered as a pyfunc, exactly as the register stage logs it, in a
temporary MLflow store; its scores mean nothing, agreement is what is tested.
"""

from __future__ import annotations

import base64
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from scoring.runtime import RECORD_FIELDS
from tests import image_factory as factory
from tests.helpers import (
    EXAMPLES,
    PROJECT,
    client_for,
    free_port,
    launched,
    register_production,
    run,
    write,
    write_tiny_bundle,
)

pytestmark = pytest.mark.slow

URI = "models:/pneumonia-cnn@production"
TOLERANCE = 1e-5
UPSIDE_DOWN = 2


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """A temporary MLflow store whose production model is a tiny artefact, registered as the stage does. Its
    orientation head finds every image upside down, so every path must turn each file back before scoring
    it and say so; it has a triage band and a subtype threshold inside its range of probabilities."""
    bundle = write_tiny_bundle(tmp_path_factory.mktemp("bundle"), threshold=0.5, orientation=UPSIDE_DOWN,
                               subtype_threshold=0.5, triage={"normal_below": 0.45, "pneumonia_from": 0.55})
    uri, _ = register_production(tmp_path_factory.mktemp("store"), bundle, experiment="parity")
    return uri


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("parity-files")
    pixels = factory.xray()
    twelve_bit = pixels.astype(np.uint16) * 16
    normal = next(path for path in EXAMPLES if path.name.startswith("normal"))
    pneumonia = next(path for path in EXAMPLES if path.name.startswith("pneumonia"))
    return {
        "normal.png": write(folder, "normal.png", normal.read_bytes()),
        "pneumonia.png": write(folder, "pneumonia.png", pneumonia.read_bytes()),
        "sixteen-bit.png": write(folder, "sixteen-bit.png",
                                 factory.encode(Image.fromarray(pixels.astype(np.uint16) * 257))),
        "scan.dcm": write(folder, "scan.dcm", factory.dicom(twelve_bit, patient_name="Doe^Jane")),
        "exif-rotated.jpg": write(folder, "exif-rotated.jpg", factory.jpeg_with_orientation(np.rot90(pixels), 6)),
        "notes.txt": write(folder, "notes.txt", b"not an image at all\n" * 10),
    }


def by_pyfunc(store: str, files: dict[str, str]) -> dict[str, tuple]:
    import mlflow

    mlflow.set_tracking_uri(store)
    mlflow.set_registry_uri(store)
    model = mlflow.pyfunc.load_model(URI)
    frame = model.predict(pd.DataFrame({"image": [Path(path).read_bytes() for path in files.values()]}))
    return {name: record(row) for name, (_, row) in zip(files, frame.iterrows())}


def record(row) -> dict:
    """A row's RECORD_FIELDS, empty cells as None, probabilities as floats."""
    values = {field: row[field] for field in RECORD_FIELDS}
    values = {field: None if value is None or value == "" or pd.isna(value) else value
              for field, value in values.items()}
    return {field: float(value) if field.startswith("probability") and value is not None else value
            for field, value in values.items()}


def by_cli(store: str, files: dict[str, str], tmp_path: Path) -> dict[str, tuple]:
    output = tmp_path / "predictions.csv"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "MLFLOW_REGISTRY_URI": store}
    run([sys.executable, "-m", "pipeline.predict", *files.values(), "--model-uri", URI, "--output", str(output)],
        PROJECT, env, expected=1)  # 1: one file could not be read
    rows = list(csv.DictReader(output.open()))
    assert list(rows[0])[:4] == ["path", "probability_pneumonia", "label", "error"]  # the outside contract
    return {Path(row["path"]).name: record(row) for row in rows}


def by_app(store: str, files: dict[str, str]) -> dict[str, tuple]:
    from gradio_client import handle_file

    import app

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", store)
        patch.setenv("MLFLOW_REGISTRY_URI", store)
        service = app.ModelService(URI).load()
        demo = app.create_demo(service)
        try:
            client = client_for(launched(demo))
            results = {}
            for name, path in files.items():
                *_, details = client.predict(handle_file(path), api_name="/predict")
                (row,) = details["results"]
                results[name] = record(row)
        finally:
            demo.close()
    return results


def by_server(store: str, files: dict[str, str]) -> dict[str, tuple]:
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "MLFLOW_REGISTRY_URI": store,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", URI, "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port), "--workers", "1"],
        env=env, cwd=PROJECT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                if httpx.get(f"{url}/ping", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        records = [{"image": base64.b64encode(Path(path).read_bytes()).decode()} for path in files.values()]
        answer = httpx.post(f"{url}/invocations", json={"dataframe_records": records}, timeout=60)
        answer.raise_for_status()
        rows = answer.json()["predictions"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    return {name: record(row) for name, row in zip(files, rows)}


def test_every_serving_path_gives_the_same_answer(store, files, tmp_path):
    answers = {"pyfunc": by_pyfunc(store, files), "cli": by_cli(store, files, tmp_path),
               "app": by_app(store, files), "mlflow models serve": by_server(store, files)}
    reference = answers["pyfunc"]
    refused = reference["notes.txt"]
    assert refused["probability_pneumonia"] is None and "not a recognised image" in refused["error"]
    assert refused["triage"] is None and refused["subtype"] is None and refused["probability_viral"] is None
    scored = [reference[name] for name in files if name != "notes.txt"]
    assert all(row["label"] in ("NORMAL", "PNEUMONIA") and "upside down" in row["note"] for row in scored)
    assert all(row["triage"] in ("NORMAL", "PNEUMONIA", "REVIEW") for row in scored)
    for way, answer in answers.items():
        assert set(answer) == set(files), way
        for name in files:
            got, expected = answer[name], reference[name]
            for field in RECORD_FIELDS:
                if field.startswith("probability") and expected[field] is not None:
                    assert abs(got[field] - expected[field]) <= TOLERANCE, (way, name, field)
                else:
                    assert got[field] == expected[field], (way, name, field, got, expected)
