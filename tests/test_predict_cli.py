"""The predict CLI: its folder scan (images by extension or, for files without one, by the DICOM marker) and\nits serving-only imports."""

from __future__ import annotations

import json
import subprocess
import sys

from pipeline.predict import expand_paths
from tests import image_factory as factory
from tests.helpers import PROJECT


def test_folders_yield_images_by_extension_and_extensionless_dicom(tmp_path):
    folder = tmp_path / "study"
    (folder / "nested").mkdir(parents=True)
    (folder / "a.png").write_bytes(factory.png(factory.xray()))
    (folder / "nested" / "b.TIFF").write_bytes(b"tiff bytes are judged by the decoder, not here")
    (folder / "IM000001").write_bytes(factory.dicom(factory.xray().astype("uint16")))
    (folder / "notes.txt").write_text("not an image")
    (folder / "README").write_text("no extension, no DICOM marker")
    (folder / ".DS_Store").write_bytes(b"\0" * 200)
    single = tmp_path / "given-explicitly.txt"
    single.write_text("files named on the command line are always passed on")
    found = expand_paths([str(folder), str(single)])
    assert [path.relative_to(tmp_path).as_posix() for path in found] == [
        "study/IM000001", "study/a.png", "study/nested/b.TIFF", "given-explicitly.txt",
    ]


def test_the_cli_loads_only_serving_code():
    # The CLI scores with the ONNX artefact: no TensorFlow, no MLflow, no training stage on import.
    code = "import json, sys, pipeline.predict; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, capture_output=True, text=True, check=True,
                            timeout=60)
    loaded = json.loads(result.stdout)
    assert "scoring.runtime" in loaded
    assert not {name.split(".")[0] for name in loaded} & {"tensorflow", "keras", "mlflow", "torch"}
    assert [name for name in loaded if name.split(".")[0] == "pipeline"] == ["pipeline", "pipeline.predict"]
