"""The Gradio app: the prediction function on every supported format and on bad inputs, Grad-CAM, and the
app launched on 127.0.0.1 driven through gradio_client.

No training: a tiny CNN with random weights, saved as an export bundle, stands in for the model. Its
scores mean nothing; the contracts (shapes, ranges, messages, one model load) are what is tested.
"""

from __future__ import annotations

import concurrent.futures
import os
import platform
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from pipeline.common import CLASS_NAMES
from pipeline.registry import BUNDLE_FILE, BUNDLE_MODEL, ModelUnavailableError
from tests import image_factory as factory

# Keras 3.15's model.save trips NumPy 2's __array__(copy=) deprecation inside Keras itself; nothing to act on.
KERAS_SAVE_WARNING = "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
pytestmark = pytest.mark.filterwarnings(KERAS_SAVE_WARNING)

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.png"))
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launched(demo, **launch_options) -> str:
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True,
                **launch_options)
    return demo.local_url


def client_for(url: str):
    from gradio_client import Client

    return Client(url, verbose=False, analytics_enabled=False)


def write(folder: Path, name: str, data: bytes) -> str:
    path = folder / name
    path.write_bytes(data)
    return str(path)


def rows(outcome) -> dict[str, tuple]:
    return {r.name: (r.probability, r.label, r.note) for r in outcome.results}


# --------------------------------------------------------------------------------------------------
# The prediction function on every supported format


def supported_files(folder: Path) -> dict[str, str]:
    pixels = factory.xray()
    rgb = Image.fromarray(pixels).convert("RGB")
    rotated = np.rot90(pixels, k=1)  # orientation 6 turns it back: the decoded image is `pixels`
    twelve_bit = pixels.astype(np.uint16) * 16
    return {
        "fixture.jpeg": write(folder, "fixture.jpeg", factory.xray_jpeg_bytes()),
        "grey.png": write(folder, "grey.png", factory.png(pixels)),
        "sixteen-bit.png": write(folder, "sixteen-bit.png",
                                 factory.encode(Image.fromarray(pixels.astype(np.uint16) * 257))),
        "rgba.png": write(folder, "rgba.png", factory.encode(rgb.convert("RGBA"))),
        "palette.png": write(folder, "palette.png", factory.encode(rgb.convert("P"))),
        "cmyk.jpg": write(folder, "cmyk.jpg", factory.encode(rgb.convert("CMYK"), "JPEG", quality=95)),
        "exif-rotated.jpg": write(folder, "exif-rotated.jpg", factory.jpeg_with_orientation(rotated, 6)),
        "mono2.dcm": write(folder, "mono2.dcm", factory.dicom(twelve_bit, patient_name="Doe^Jane")),
        "mono1.dcm": write(folder, "mono1.dcm", factory.dicom(4095 - twelve_bit, photometric="MONOCHROME1")),
        "no-extension-dicom": write(folder, "no-extension-dicom", factory.dicom(twelve_bit)),
    }


def test_every_supported_format_is_scored(app_module, service, tmp_path):
    files = supported_files(tmp_path)
    outcome = app_module.predict_files(list(files.values()), service)
    results = rows(outcome)
    assert set(results) == set(files)
    for name, (probability, label, note) in results.items():
        assert note == "", (name, note)
        assert 0.0 <= probability <= 1.0
        assert label == CLASS_NAMES[int(probability >= service.predictor.threshold)]
        # The app scores exactly as the shared serving path does.
        data = Path(files[name]).read_bytes()
        assert probability == pytest.approx(service.predictor.probability_of(data), abs=1e-6)
    # Same pixels through DICOM MONOCHROME1 (inverted) and MONOCHROME2: the same image, the same score.
    assert results["mono1.dcm"][0] == pytest.approx(results["mono2.dcm"][0], abs=1e-6)
    assert results["no-extension-dicom"][0] == pytest.approx(results["mono2.dcm"][0], abs=1e-6)
    assert outcome.overlay.shape == (*factory.xray().shape, 3)
    assert f"Scored {len(files)} of {len(files)} files" in outcome.status


def test_single_image_gives_label_with_threshold_and_heatmap(app_module, service):
    outcome = app_module.predict_files([str(EXAMPLES[0])], service)
    ((key, probability),) = outcome.label.items()
    result = outcome.results[0]
    assert probability == result.probability
    assert key.startswith(result.label + ":")
    assert f"threshold {service.predictor.threshold:.1%}" in key
    assert outcome.overlay.dtype == np.uint8 and outcome.overlay.shape == (224, 224, 3)
    table = outcome.table()
    assert list(table.columns) == app_module.COLUMNS
    assert table.iloc[0]["file"] == EXAMPLES[0].name


def test_examples_exist_for_both_classes():
    kinds = {path.name.split("_")[0].split("-")[0] for path in EXAMPLES}
    assert kinds == {"normal", "pneumonia"}
    for path in EXAMPLES:
        assert path.stat().st_size < 100_000
        with Image.open(path) as image:
            assert image.mode == "L" and image.size == (224, 224)


# --------------------------------------------------------------------------------------------------
# Bad inputs: a clear message in the file's row, never an exception


def bad_files(folder: Path) -> dict[str, tuple[str, str]]:
    """name -> (path, a fragment the row's note must contain)."""
    good_png = factory.png(factory.xray())
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    files = {
        "notes.txt": (b"patient notes, not an image\n" * 20, "not a recognised image"),
        "truncated.png": (good_png[: len(good_png) // 2], "corrupt or truncated"),
        "empty.png": (b"", "empty file"),
        "bomb.png": (factory.blank_png(20_000, 20_000), "megapixel limit"),
        "tiny.png": (factory.png(np.full((8, 8), 100, dtype=np.uint8)), "too small"),
        "colour-photo.png": (factory.encode(Image.fromarray(noise)), "strongly coloured"),
        "strip.png": (factory.png(factory.ramp(900, 200)), "too elongated"),
        "flat.png": (factory.png(np.full((256, 256), 128, dtype=np.uint8)), "almost uniform"),
        "no-pixels.dcm": (factory.dicom(factory.xray().astype(np.uint16), with_pixels=False), "no pixel data"),
        "fake.dcm": (b"\x00" * 128 + b"DICM" + b"\xff" * 64, "dicom"),
    }
    return {name: (write(folder, name, data), fragment) for name, (data, fragment) in files.items()}


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter:UserWarning")  # fake.dcm
def test_bad_inputs_get_clear_messages_and_good_ones_are_still_scored(app_module, service, tmp_path):
    bad = bad_files(tmp_path)
    paths = [path for path, _ in bad.values()] + [str(EXAMPLES[0])]
    outcome = app_module.predict_files(paths, service)
    results = rows(outcome)
    for name, (_, fragment) in bad.items():
        probability, label, note = results[name]
        assert probability is None and label is None
        assert fragment.lower() in note.lower(), (name, note)
        assert name in outcome.status
    assert results[EXAMPLES[0].name][0] is not None
    assert outcome.label is not None and outcome.overlay is not None  # for the one good file
    assert f"Scored 1 of {len(paths)} files" in outcome.status


def test_only_bad_inputs_give_no_label_or_heatmap(app_module, service, tmp_path):
    outcome = app_module.predict_files([write(tmp_path, "x.jpg", b"GIF89a garbage")], service)
    assert outcome.label is None and outcome.overlay is None
    assert "not a recognised image" in outcome.results[0].note
    assert "Scored 0 of 1 file" in outcome.status


def test_file_over_the_size_cap(app_module, service):
    outcome = app_module.predict_files([str(EXAMPLES[0])], service, max_file_bytes=10_000)
    assert "over the 10 kB limit" in outcome.results[0].note


def test_too_many_files(app_module, service):
    paths = [str(EXAMPLES[0])] * (app_module.MAX_FILES + 2)
    outcome = app_module.predict_files(paths, service)
    notes = [r.note for r in outcome.results]
    assert notes[: app_module.MAX_FILES] == [""] * app_module.MAX_FILES
    assert all(f"at most {app_module.MAX_FILES} files" in note for note in notes[app_module.MAX_FILES:])


def test_nothing_uploaded(app_module, service):
    for nothing in (None, []):
        outcome = app_module.predict_files(nothing, service)
        assert outcome.results == [] and "Upload" in outcome.status


def test_prediction_logs_no_image_content_or_names(app_module, service, tmp_path, caplog):
    path = write(tmp_path, "Doe^Jane.dcm", factory.dicom(factory.xray().astype(np.uint16) * 16,
                                                         patient_name="Doe^Jane"))
    demo = app_module.create_demo(service=service)
    with caplog.at_level("DEBUG"):
        demo([path], api_name="predict_files")
    assert "Doe" not in caplog.text and "PID-" not in caplog.text


# --------------------------------------------------------------------------------------------------
# Grad-CAM


def test_gradcam_heatmap_has_the_image_shape_and_unit_range(service):
    from pipeline.gradcam import overlay

    grey = factory.xray()[:, 20:190]  # not square, not the model's input size
    for towards in (True, False):
        heat = service.explainer.heatmap(grey, towards_pneumonia=towards)
        assert heat.shape == grey.shape and heat.dtype == np.float32
        assert 0.0 <= heat.min() and heat.max() <= 1.0
    picture = overlay(grey, heat)
    assert picture.shape == (*grey.shape, 3) and picture.dtype == np.uint8


def test_gradcam_peak_is_one_unless_the_map_is_empty(service):
    for grey in (factory.xray(), factory.ramp(300, 200)):
        for towards in (True, False):
            assert service.explainer.heatmap(grey, towards).max() in (0.0, 1.0)


def test_overlay_leaves_the_image_alone_where_the_heatmap_is_zero():
    from pipeline.gradcam import overlay

    grey = factory.xray()
    picture = overlay(grey, np.zeros(grey.shape, dtype=np.float32))
    assert (picture == grey[..., np.newaxis]).all()
    with pytest.raises(ValueError):
        overlay(grey, np.zeros((3, 3), dtype=np.float32))


def test_gradcam_is_traced_once_not_per_request(app_module, service):
    for grey in (factory.xray(), factory.xray()[:100, :150], factory.ramp(300, 200)):
        service.explainer.heatmap(grey)
    app_module.predict_files([str(path) for path in EXAMPLES], service)
    assert service.explainer._cams.experimental_get_tracing_count() == 1


# --------------------------------------------------------------------------------------------------
# Start-up: the model loads once; no model still gives a working page


def test_model_loads_once_per_app_not_per_request(app_module, tiny_bundle, monkeypatch):
    calls = []
    real = app_module.load_serving_model
    monkeypatch.setattr(app_module, "load_serving_model", lambda uri: calls.append(uri) or real(uri))
    demo = app_module.create_demo(str(tiny_bundle))
    for _ in range(3):
        demo(str(EXAMPLES[0]), api_name="predict")
    assert calls == [str(tiny_bundle)]


def test_unreadable_model_file_becomes_a_message_not_a_crash(app_module, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / BUNDLE_FILE).write_text("{}")
    (folder / BUNDLE_MODEL).write_bytes(b"not a zip file")
    service = app_module.load_service(str(folder))
    assert not service.ready and str(folder) in service.problem


@pytest.fixture(scope="module")
def no_model_service(app_module, tmp_path_factory):
    """The app's service where the MLflow store (a new, empty one) has no production model."""
    store = tmp_path_factory.mktemp("empty-store") / "mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store.as_posix()}")
        return app_module.load_service("models:/pneumonia-cnn@production")


def test_no_model_service_explains_how_to_train(app_module, no_model_service):
    assert not no_model_service.ready
    assert "make repro" in no_model_service.problem
    with pytest.raises(ModelUnavailableError):
        app_module.predict_files([str(EXAMPLES[0])], no_model_service)
    assert app_module.predict_files([], no_model_service).status == app_module.UPLOAD_PROMPT  # a cleared box
    assert "make repro" in app_module.model_panel(no_model_service)


def test_parse_args_defaults_and_environment(app_module, monkeypatch):
    for name in ("GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT", "GRADIO_SHARE", "PNEUMONIA_MODEL_URI",
                 "PNEUMONIA_MAX_FILE_MB"):
        monkeypatch.delenv(name, raising=False)
    defaults = app_module.parse_args([])
    assert (defaults.host, defaults.port, defaults.share, defaults.model_uri, defaults.max_file_mb) == (
        "127.0.0.1", 7860, False, None, 20)
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "9000")
    monkeypatch.setenv("GRADIO_SHARE", "true")
    monkeypatch.setenv("PNEUMONIA_MODEL_URI", "exports/model")
    from_env = app_module.parse_args([])
    assert (from_env.host, from_env.port, from_env.share, from_env.model_uri) == (
        "0.0.0.0", 9000, True, "exports/model")
    flags = app_module.parse_args(["--host", "127.0.0.2", "--port", "8000", "--model-uri", "models:/m/2"])
    assert (flags.host, flags.port, flags.model_uri) == ("127.0.0.2", 8000, "models:/m/2")


def test_module_level_demo_is_bounded_and_cleans_its_cache(app_module):
    demo = app_module.demo
    assert demo.delete_cache == app_module.DELETE_CACHE
    assert demo._queue.max_size == app_module.QUEUE_SIZE
    assert not demo.analytics_enabled


# --------------------------------------------------------------------------------------------------
# The launched app, through gradio_client and plain HTTP


@pytest.fixture(scope="module")
def live_app(app_module, service) -> Iterator[tuple[str, object]]:
    demo = app_module.create_demo(service=service, max_file_bytes=100_000)
    url = launched(demo, max_file_size=100_000)
    try:
        yield url, client_for(url)
    finally:
        demo.close()


def test_client_prediction_through_the_named_endpoint(live_app, service):
    from gradio_client import handle_file

    _, client = live_app
    label, heatmap, table, status = client.predict(handle_file(str(EXAMPLES[0])), api_name="/predict")
    probability = label["confidences"][0]["confidence"]
    assert 0.0 <= probability <= 1.0
    assert label["label"].split(":")[0] in CLASS_NAMES
    assert probability == pytest.approx(service.predictor.probability_of(EXAMPLES[0].read_bytes()), abs=1e-6)
    with Image.open(heatmap) as image:
        assert image.size == (224, 224) and image.mode == "RGB"
    assert table["headers"] == ["file", "probability of pneumonia", "result", "note"]
    assert table["data"][0][0] == EXAMPLES[0].name
    assert "Scored 1 of 1 file" in status


def test_client_several_files_give_a_table(live_app, tmp_path):
    from gradio_client import handle_file

    _, client = live_app
    bad = write(tmp_path, "notes.txt", b"not an image")
    files = [handle_file(str(path)) for path in EXAMPLES] + [handle_file(bad)]
    label, _, table, status = client.predict(files, api_name="/predict_files")
    assert [row[0] for row in table["data"]] == [path.name for path in EXAMPLES] + ["notes.txt"]
    assert all(0.0 <= row[1] <= 1.0 and row[2] in CLASS_NAMES for row in table["data"][:-1])
    assert table["data"][-1][1] is None and "not a recognised image" in table["data"][-1][3]
    assert label["confidences"] and f"Scored {len(EXAMPLES)} of {len(EXAMPLES) + 1} files" in status


def test_client_non_image_gets_our_message(live_app, tmp_path):
    from gradio_client import handle_file

    _, client = live_app
    path = write(tmp_path, "report.pdf", b"%PDF-1.4 not really\n" * 10)
    label, heatmap, table, status = client.predict(handle_file(path), api_name="/predict")
    assert label in (None, {}) and heatmap is None
    row = table["data"][0]
    assert row[0] == "report.pdf" and "not a recognised image (expected PNG, JPEG or DICOM)" in row[3]
    assert "Scored 0 of 1 file" in status


def test_oversize_upload_is_refused_by_the_server(live_app, tmp_path):
    url, client = live_app
    noise = np.random.default_rng(1).integers(0, 256, (400, 400), dtype=np.uint8)
    big = write(tmp_path, "big.png", factory.png(noise))
    assert Path(big).stat().st_size > 100_000
    # Straight to the upload route, as a browser would: the server itself answers 413.
    with open(big, "rb") as handle:
        response = httpx.post(f"{url.rstrip('/')}/gradio_api/upload", files={"files": ("big.png", handle)})
    assert response.status_code == 413
    # gradio_client refuses before sending.
    from gradio_client import handle_file

    with pytest.raises(Exception, match="maximum file size"):
        client.predict(handle_file(big), api_name="/predict")


def test_page_and_api_are_served(live_app):
    url, client = live_app
    page = httpx.get(url)
    assert page.status_code == 200
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/predict", "/predict_files"} <= set(endpoints)


def test_app_without_a_model_starts_and_says_how_to_train(app_module, no_model_service):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    demo = app_module.create_demo(service=no_model_service)
    url = launched(demo)
    try:
        config = httpx.get(f"{url.rstrip('/')}/config").text
        assert "No model is loaded" in config and "make repro" in config
        with pytest.raises(AppError, match="make repro"):
            client_for(url).predict(handle_file(str(EXAMPLES[0])), api_name="/predict")
    finally:
        demo.close()


def test_malloc_tuning_defers_to_the_environment(app_module, monkeypatch):
    for name in [name for name in os.environ if name.startswith("MALLOC_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert app_module.tune_malloc() is False
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    assert app_module.tune_malloc() is (platform.libc_ver()[0] == "glibc")


def test_model_work_runs_on_one_thread_whichever_thread_asks(app_module, service, monkeypatch):
    seen: set[str] = set()
    score = app_module.score_and_render

    def recording(*args):
        seen.add(threading.current_thread().name)
        return score(*args)

    monkeypatch.setattr(app_module, "score_and_render", recording)
    demo = app_module.create_demo(service=service)
    on_predict = next(event.fn for event in demo.fns.values() if event.api_name == "predict")
    with concurrent.futures.ThreadPoolExecutor(4) as callers:
        answers = list(callers.map(lambda _: on_predict(str(EXAMPLES[0])), range(8)))
    assert all(answer[0] for answer in answers) and len(seen) == 1 and seen.pop().startswith("model")
