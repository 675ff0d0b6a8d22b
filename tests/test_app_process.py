"""`python app.py` as a real process: nothing uploaded survives it, and it never loads TensorFlow.

Each test starts the app with its own temporary folder (TMPDIR), uploads an X-ray through gradio_client,
then stops the app with a real signal and looks at what is left on disk.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import EXAMPLES, PROJECT, client_for, free_port

pytestmark = pytest.mark.slow

START_TIMEOUT_S = 90


def as_from_a_terminal() -> None:
    """SIGINT and SIGHUP at their defaults, as a terminal starts the app, whatever the test runner's own
    dispositions (a runner started in the background by a non-interactive shell ignores SIGINT)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def as_with_nohup() -> None:
    """`nohup python app.py &`: SIGHUP ignored, which the app must keep."""
    as_from_a_terminal()
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def start_app(model: Path | None, tmp: Path, starter=as_from_a_terminal, args: tuple[str, ...] = (),
              env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """`python app.py --port PORT *args` serving `model` (None: no PNEUMONIA_MODEL_URI, so the app's own
    default, the registry's production alias, in the store `env` names), once it answers HTTP."""
    tmp.mkdir(exist_ok=True)
    port = free_port()
    env = {**os.environ, **(env or {}), "TMPDIR": str(tmp)}
    env.pop("PNEUMONIA_MODEL_URI", None)
    if model is not None:
        env["PNEUMONIA_MODEL_URI"] = str(model)
    env.pop("GRADIO_TEMP_DIR", None)  # as on a real machine: the app picks its own private folder
    process = subprocess.Popen([sys.executable, "app.py", "--port", str(port), *args], cwd=PROJECT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               preexec_fn=starter)  # noqa: PLW1509 (it only sets signal dispositions)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"app exited early:\n{process.stdout.read()}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.3)
    process.kill()
    raise AssertionError("app did not start")


# ONNX Runtime's own marker file (a launch time and a random id, written when it is imported): not ours.
ONNX_RUNTIME_MARKER = ".ses"


def cached_files(tmp: Path) -> list[Path]:
    return [path for path in tmp.rglob("*") if path.is_file() and path.name != ONNX_RUNTIME_MARKER]


UPLOAD_NAME = "Doe^Jane-upload.png"  # a name only an upload has (the page's examples are cached too)


def upload(url: str, folder: Path) -> None:
    from gradio_client import handle_file

    source = folder / "to-upload" / UPLOAD_NAME
    source.parent.mkdir(exist_ok=True)
    source.write_bytes(EXAMPLES[0].read_bytes())
    label, heatmap, *_ = client_for(url).predict(handle_file(str(source)), api_name="/predict")
    assert label and heatmap


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_app_deletes_every_upload_and_heatmap(tiny_bundle, tmp_path, stop):
    process, url = start_app(tiny_bundle, tmp_path / "app")
    try:
        upload(url, tmp_path)
        names = {path.name for path in cached_files(tmp_path / "app")}
        assert UPLOAD_NAME in names and "heatmap.png" in names  # what would otherwise be left behind
        process.send_signal(stop)
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode is not None
    assert "deleted the upload cache" in output
    assert cached_files(tmp_path / "app") == [], output


def test_an_app_started_with_nohup_keeps_serving_through_a_hangup(tiny_bundle, tmp_path):
    process, url = start_app(tiny_bundle, tmp_path / "app", starter=as_with_nohup)
    try:
        process.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert process.poll() is None
        upload(url, tmp_path)  # still serving
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert "deleted the upload cache" in output
    assert cached_files(tmp_path / "app") == [], output


def test_a_killed_apps_uploads_are_swept_by_the_next_start(tiny_bundle, tmp_path):
    process, url = start_app(tiny_bundle, tmp_path / "app")
    upload(url, tmp_path)
    process.kill()  # SIGKILL: the one signal an app cannot act on
    process.wait(timeout=30)
    (left,) = (tmp_path / "app").glob(f"pneumonia-app-{process.pid}-*")
    assert any(path.name == UPLOAD_NAME for path in left.rglob("*"))
    process, _ = start_app(tiny_bundle, tmp_path / "app")
    try:
        assert not left.exists()
        assert not [path for path in cached_files(tmp_path / "app") if path.name in (UPLOAD_NAME, "heatmap.png")]
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)


def test_the_serving_process_never_maps_tensorflow(tiny_bundle, tmp_path):
    process, url = start_app(tiny_bundle, tmp_path / "app")
    try:
        upload(url, tmp_path)
        maps = Path(f"/proc/{process.pid}/maps").read_text()
        status = Path(f"/proc/{process.pid}/status").read_text()
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)
    assert "tensorflow" not in maps.lower() and "onnxruntime" in maps.lower()
    resident_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))
    assert resident_kb < 600_000  # TensorFlow alone would take it past this
