"""The "On this device" page from a real `python app.py`, started each way a user starts it: the registry's
production alias (the default, resolved by the helper process of `scoring.store.PendingArtefact`), an
exported model folder and a local `.onnx` file. Each time Chromium loads ONNX Runtime Web's WebAssembly and
the model, and the bytes the page gets are the very artefact the server scores with (sha256 checked against
the registered or exported file, the page's config and the ETag), scoring an X-ray as `POST /api/v1/predict`
does."""

from __future__ import annotations

import base64
import hashlib
import signal
from pathlib import Path

import httpx
import pytest

from serving import ondevice
from tests.helpers import BROWSER_TEST_MARKS, EXAMPLES, register_production
from tests.test_app_process import start_app

pytestmark = [*BROWSER_TEST_MARKS, pytest.mark.slow,
              pytest.mark.skipif(not ondevice.assets_built(), reason="needs the on-device runtime: run `make web`")]

TIMEOUT_MS = 120_000  # two busy cores, a cold app and a cold browser context
PROBABILITY_TOLERANCE = 1e-4  # WebAssembly and native ONNX Runtime round differently (docs/on-device.md)
SCORE_JS = """
async (data) => {
  const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
  return await window.pneumoniaOnDevice.score(bytes, "x.png");
}
"""


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_bundle) -> tuple[dict[str, str], Path]:
    """The environment of a throwaway store whose production alias is the tiny model, and its artefact."""
    uri, artefact = register_production(tmp_path_factory.mktemp("store"), tiny_bundle, experiment="on-device")
    return {"MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri}, artefact


def started(way: str, registry, tiny_bundle: Path, tmp_path: Path):
    """The app process, started `way`, and the artefact file whose bytes it must serve."""
    if way == "registry alias":  # plain `python app.py`: no --model-uri, no PNEUMONIA_MODEL_URI
        env, artefact = registry
        return start_app(None, tmp_path / "app", env=env), artefact
    model = tiny_bundle if way == "exported folder" else tiny_bundle / "model.onnx"
    return start_app(None, tmp_path / "app", args=("--model-uri", str(model))), tiny_bundle / "model.onnx"


@pytest.mark.parametrize("way", ["registry alias", "exported folder", "local onnx file"])
def test_the_page_runs_the_served_artefact_however_the_app_was_started(browser, registry, tiny_bundle, tmp_path,
                                                                       way):
    (process, url), artefact = started(way, registry, tiny_bundle, tmp_path)
    expected = hashlib.sha256(artefact.read_bytes()).hexdigest()
    fetched: dict[str, object] = {}  # file name -> Playwright's response (read once the page is ready)
    context = browser.new_context()
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.on("response", lambda response: fetched.update({response.url.rsplit("/", 1)[-1].split("?")[0]: response}))
        page.goto(f"{url}{ondevice.PAGE_PATH}")
        page.wait_for_function("window.pneumoniaOnDevice && "
                               "['ready', 'failed'].includes(window.pneumoniaOnDevice.status)")
        state = page.evaluate("({status: window.pneumoniaOnDevice.status, message: window.pneumoniaOnDevice.message})")
        assert state["status"] == "ready", state["message"]
        # ONNX Runtime Web's WebAssembly was fetched and compiled (the session exists: the page is ready).
        wasm = fetched[ondevice.ORT_WASM[1]]
        assert wasm.status == 200 and wasm.body()[:4] == b"\0asm"
        # The bytes the page got are the artefact the server loaded: the registered (or exported) file.
        model = fetched["model.onnx"].body()
        assert fetched["model.onnx"].status == 200 and hashlib.sha256(model).hexdigest() == expected
        config = httpx.get(f"{url}ondevice/config.json", timeout=30).json()
        assert config["model"]["sha256"] == expected and config["model"]["bytes"] == len(model)
        served = httpx.get(f"{url}ondevice/model.onnx", timeout=30)
        assert served.headers["etag"] == f'"{expected}"' and hashlib.sha256(served.content).hexdigest() == expected
        # And it scores as the server does.
        device = page.evaluate(SCORE_JS, base64.b64encode(EXAMPLES[0].read_bytes()).decode())
        answer = httpx.post(f"{url}api/v1/predict", files=[("files", (EXAMPLES[0].name, EXAMPLES[0].read_bytes()))],
                            timeout=60).json()
        (server,) = answer["results"]
        assert device["label"] == server["label"] and device["error"] is None
        assert abs(device["probability_pneumonia"] - server["probability_pneumonia"]) <= PROBABILITY_TOLERANCE
    finally:
        context.close()
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
