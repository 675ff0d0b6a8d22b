"""The Gradio app: the prediction function on every supported format and on bad inputs, the class-activation
map overlay, the model panel, the JSON details, and the app launched on 127.0.0.1 driven through gradio_client.

No training: a tiny CNN with random weights, exported as an ONNX serving artefact (the `tiny_bundle`
fixture), stands in for the model. Its scores mean nothing; the contracts (shapes, ranges, messages, one
model load) are what is tested.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import platform
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from scoring import checks, wording
from scoring.card import NOT_A_DEVICE
from scoring.decision import CLASS_NAMES
from scoring.imaging import decode_greyscale
from scoring.pixels import MAX_FILE_BYTES
from scoring.store import ARTEFACT_NAME, ModelUnavailableError
from serving import gradio_workarounds as workarounds
from serving import results as app_results
from serving import server_page
from serving import service as service_module
from serving.overlay import OVERLAY_MAX_SIDE, heatmap, overlay
from tests import image_factory as factory
from tests.helpers import EXAMPLES, KERAS_SAVE_WARNING, client_for, column, launched, write

pytestmark = [
    pytest.mark.filterwarnings(KERAS_SAVE_WARNING),  # the session's tiny_bundle is built with Keras
    pytest.mark.filterwarnings("ignore::Warning:gradio.queueing"),  # Gradio's own pandas deprecations
]


def rows(outcome) -> dict[str, tuple]:
    """file name -> (probability, label, note); results are named by their upload path."""
    return {Path(r.name).name: (r.probability, r.label, r.error or "") for r in outcome.results}


def probability_of(service, data: bytes) -> float | None:
    """The shared serving path's probability for one file's bytes."""
    return service.predictor.predict([("x", data)])[0].probability


def expected_details(service, entries: list[tuple[str, Path | None, str | None]]) -> dict:
    """The JSON's shape, as `POST /api/v1/predict` answers: the model, and per file its name and
    `Prediction.record()`, as the shared serving path gives them for the file at `path` (None: refused with
    `error`)."""
    return {"model": {"name": "tiny-test-model", "version": "7", "threshold": service.predictor.threshold},
            "results": [expected_entry(service, name, path, error) for name, path, error in entries]}


def expected_entry(service, name: str, path: Path | None, error: str | None) -> dict:
    if path is None:
        return {"name": name, "probability_pneumonia": None, "label": None, "error": error, "triage": None,
                "subtype": None, "probability_viral": None, "note": None, "ood_score": None}
    (prediction,) = service.predictor.predict([("x", Path(path).read_bytes())])
    record = prediction.record()
    for key in ("probability_pneumonia", "probability_viral"):
        record[key] = pytest.approx(record[key], abs=1e-6)
    return {"name": name, **record}


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
    outcome = app_results.predict_files(list(files.values()), service)
    results = rows(outcome)
    assert set(results) == set(files)
    for name, (probability, label, note) in results.items():
        assert note == "", (name, note)
        assert 0.0 <= probability <= 1.0
        assert label == CLASS_NAMES[int(probability >= service.predictor.threshold)]
        # The app scores exactly as the shared serving path does.
        data = Path(files[name]).read_bytes()
        assert probability == pytest.approx(probability_of(service, data), abs=1e-6)
    # Same pixels through DICOM MONOCHROME1 (inverted) and MONOCHROME2: the same image, the same score.
    assert results["mono1.dcm"][0] == pytest.approx(results["mono2.dcm"][0], abs=1e-6)
    assert results["no-extension-dicom"][0] == pytest.approx(results["mono2.dcm"][0], abs=1e-6)
    assert outcome.overlay.shape == (*factory.xray().shape, 3)
    assert f"Scored {len(files)} of {len(files)} files" in outcome.status
    # The table and the JSON details name files, never the server's upload paths.
    assert column(outcome.table(), "file") == list(files)
    assert [entry["name"] for entry in outcome.details["results"]] == list(files)
    assert str(tmp_path) not in json.dumps(outcome.details) + outcome.status


def test_single_image_gives_label_with_threshold_and_heatmap(app_module, service):
    outcome = app_results.predict_files([str(EXAMPLES[0])], service)
    result = outcome.results[0]
    text = outcome.result_text()
    # The decision once, as the heading; the figures in percent, as everywhere on the page.
    assert text.startswith(f"### {app_results.result_words(result)}\n")
    assert text.count(app_results.result_words(result)) == 1
    # The decision sentence every page shows (scoring.wording), here for the selected file.
    assert wording.decision_sentence(result.record(), service.predictor.threshold) in text
    assert f"{result.label}: probability of pneumonia {result.probability:.1%}, threshold " \
           f"{service.predictor.threshold:.1%}" in text and EXAMPLES[0].name in text
    assert outcome.overlay.dtype == np.uint8 and outcome.overlay.shape == (224, 224, 3)
    table = outcome.table()
    assert table["headers"] == app_results.COLUMNS
    assert column(table, "file") == [EXAMPLES[0].name]


def test_examples_exist_for_both_classes():
    kinds = {path.name.split("_")[0].split("-")[0] for path in EXAMPLES}
    assert kinds == {"normal", "pneumonia"}
    for path in EXAMPLES:
        assert path.stat().st_size < 100_000
        with Image.open(path) as image:
            assert image.mode == "L" and image.size == (224, 224)


# --------------------------------------------------------------------------------------------------
# The JSON details: what the API returns beside the display


def test_details_give_model_threshold_and_one_entry_per_file(app_module, service, tmp_path):
    bad = write(tmp_path, "notes.txt", b"patient notes, not an image\n" * 20)
    outcome = app_results.predict_files([str(EXAMPLES[0]), bad, str(EXAMPLES[-1])], service)
    details = outcome.details
    assert details == expected_details(service, [
        (EXAMPLES[0].name, EXAMPLES[0], None),
        ("notes.txt", None, "not a recognised image (expected PNG, JPEG or DICOM)"),
        (EXAMPLES[-1].name, EXAMPLES[-1], None),
    ])
    # The rows the table shows: probabilities in percent there, fractions in the JSON; the same refusal.
    table = outcome.table()
    assert column(table, "file") == [e["name"] for e in details["results"]]
    assert column(table, "probability of pneumonia") == [wording.percent(e["probability_pneumonia"])
                                                         for e in details["results"]]
    assert column(table, "note")[1].startswith(details["results"][1]["error"])
    assert json.loads(json.dumps(details)) == details


def test_details_of_a_request_with_nothing_scored(app_module, service, tmp_path):
    outcome = app_results.predict_files([write(tmp_path, "x.jpg", b"GIF89a garbage")], service)
    assert outcome.details["model"] == {"name": "tiny-test-model", "version": "7", "threshold": 0.5}
    (entry,) = outcome.details["results"]
    assert entry["name"] == "x.jpg" and entry["probability_pneumonia"] is None and entry["label"] is None
    assert "not a recognised image" in entry["error"]
    assert app_results.predict_files([], service).details == {}  # nothing uploaded: nothing to describe


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


IMPLAUSIBLE = ("colour-photo.png", "strip.png", "flat.png")  # decode fine, refused by scoring.checks


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter:UserWarning")  # fake.dcm
def test_bad_inputs_get_clear_messages_and_good_ones_are_still_scored(app_module, service, tmp_path):
    bad = bad_files(tmp_path)
    paths = [path for path, _ in bad.values()] + [str(EXAMPLES[0])]
    outcome = app_results.predict_files(paths, service)
    results = rows(outcome)
    for name, (_, fragment) in bad.items():
        probability, label, note = results[name]
        assert probability is None and label is None
        assert fragment.lower() in note.lower(), (name, note)
        assert name in outcome.status
    assert results[EXAMPLES[0].name][0] is not None
    assert outcome.result_text() and outcome.overlay is not None  # for the one good file
    assert outcome.shown == len(paths) - 1
    assert f"Scored 1 of {len(paths)} files" in outcome.status


def test_plausibility_refusals_come_from_serving_checks(app_module, service, tmp_path, monkeypatch):
    bad = bad_files(tmp_path)
    paths = [bad[name][0] for name in IMPLAUSIBLE]
    results = rows(app_results.predict_files(paths, service))
    for name, path in zip(IMPLAUSIBLE, paths, strict=True):
        data = Path(path).read_bytes()
        expected = checks.implausibility(data, decode_greyscale(data))
        assert expected and expected.startswith("not scored:")
        assert results[name][2] == expected
    # The app has no checks of its own: without scoring.checks' verdict the same files are scored.
    monkeypatch.setattr(checks, "implausibility", lambda data, grey: None)
    unchecked = rows(app_results.predict_files(paths, service))
    assert all(0.0 <= probability <= 1.0 and note == "" for probability, _, note in unchecked.values())
    # The page states the checks as scoring.checks applies them.
    assert checks.CHECKS_TEXT in server_page.CHECKS_MARKDOWN
    assert f"above {checks.COLOUR_SPREAD_LIMIT:.0f} of 255" in checks.CHECKS_TEXT
    assert f"over {checks.MAX_ASPECT:.0f} times the other" in checks.CHECKS_TEXT


def test_only_bad_inputs_give_no_label_or_heatmap(app_module, service, tmp_path):
    outcome = app_results.predict_files([write(tmp_path, "x.jpg", b"GIF89a garbage")], service)
    assert outcome.result_text() == "" and outcome.overlay is None and outcome.shown is None
    assert "not a recognised image" in outcome.results[0].error
    assert "Scored 0 of 1 file" in outcome.status


def test_a_file_over_the_size_limit_gets_its_row_and_the_others_are_scored(app_module, service, tmp_path):
    big = write(tmp_path, "big.png", b"\x89PNG" + bytes(27_000_000))
    outcome = app_results.predict_files([big, str(EXAMPLES[0])], service, max_file_bytes=20_000_000)
    over, scored = outcome.results
    assert over.error == "file is 27 MB, over the 20 MB limit"  # the decoder's own words, before reading it
    assert column(outcome.table(), "note")[0].startswith("file is 27 MB, over the 20 MB limit. Export the X-ray")
    assert scored.scored and outcome.shown == 1
    assert column(outcome.table(), "result") == ["Not scored", app_results.result_words(scored)]
    assert "Scored 1 of 2 files" in outcome.status and "`big.png`: file is 27 MB" in outcome.status
    assert wording.megabytes(100_000) == "0.1 MB" and wording.megabytes(27_345_678) == "27.3 MB"


def test_too_many_files(app_module, service):
    paths = [str(EXAMPLES[0])] * (app_module.MAX_FILES + 2)
    outcome = app_results.predict_files(paths, service)
    notes = column(outcome.table(), "note")
    assert len(notes) == len(paths)
    assert notes[: app_module.MAX_FILES] == [""] * app_module.MAX_FILES
    assert all(r.scored for r in outcome.results[: app_module.MAX_FILES])
    assert all(f"at most {app_module.MAX_FILES} files" in note for note in notes[app_module.MAX_FILES:])
    assert not any(r.scored for r in outcome.results[app_module.MAX_FILES:])


def test_the_table_allocates_nothing_in_arrows_memory_pool(app_module, service, tmp_path):
    """pandas 3 keeps strings in Arrow's pool, which held on to memory request after request: the table
    reaches Gradio as plain rows, and Gradio's own processing of them creates no Arrow arrays."""
    pyarrow = pytest.importorskip("pyarrow")
    import gradio as gr

    pool = pyarrow.default_memory_pool()
    before = pool.num_allocations()
    bad = write(tmp_path, "notes.txt", b"not an image")
    table = app_results.predict_files([str(EXAMPLES[0]), bad], service).table()
    shown = gr.Dataframe(headers=app_results.COLUMNS, interactive=False).postprocess(table)
    assert [row[0] for row in shown.data] == [EXAMPLES[0].name, "notes.txt"]
    assert pool.num_allocations() == before


def test_the_queue_summarises_few_events_and_seldom(app_module, service, monkeypatch):
    """Gradio's monitoring summary, rebuilt over the last 10,000 events after every event, grew the app's
    memory and CPU per request with the requests served: the app bounds both with Gradio's own settings,
    which its queue reads when it is made, and leaves values already in the environment alone."""
    events, every = "GRADIO_ANALYTICS_MAX_EVENTS", "GRADIO_ANALYTICS_CACHE_FREQUENCY"
    monkeypatch.delenv(events, raising=False)
    monkeypatch.delenv(every, raising=False)
    app_module.create_demo(service)
    assert os.environ[events] == str(workarounds.ANALYTICS_EVENTS_KEPT)
    assert os.environ[every] == str(workarounds.ANALYTICS_SUMMARY_EVERY)
    monkeypatch.setenv(events, "7")
    app_module.create_demo(service)
    assert os.environ[events] == "7"


def test_the_queue_refuses_what_it_cannot_hold(app_module, service, monkeypatch):
    """One event runs at a time and QUEUE_SIZE wait: the next one is refused ("Queue is full", HTTP 503)."""
    running, release = threading.Event(), threading.Event()
    score = server_page.score_and_render

    def held(*args):
        running.set()
        release.wait(60)
        return score(*args)

    monkeypatch.setattr(server_page, "score_and_render", held)
    demo = app_module.create_demo(service)
    url = launched(demo)
    try:
        fn_index = next(index for index, fn in demo.fns.items() if fn.api_name == "predict_files")
        join = f"{url.rstrip('/')}/gradio_api/queue/join"

        def send(session: int) -> int:
            body = {"data": [None], "fn_index": fn_index, "session_hash": f"queue-test-{session}"}
            return httpx.post(join, json=body, timeout=30).status_code

        statuses = [send(0)]
        assert running.wait(30)  # the first event holds the model thread; the others wait
        statuses += [send(session) for session in range(1, app_module.QUEUE_SIZE + 2)]
    finally:
        release.set()
        demo.close()
    assert statuses == [200] * (app_module.QUEUE_SIZE + 1) + [503]


def test_nothing_uploaded(app_module, service):
    for nothing in (None, []):
        outcome = app_results.predict_files(nothing, service)
        assert outcome.results == [] and "Upload" in outcome.status


def test_prediction_logs_no_image_content_or_names(app_module, service, tmp_path, caplog):
    path = write(tmp_path, "Doe^Jane.dcm", factory.dicom(factory.xray().astype(np.uint16) * 16,
                                                         patient_name="Doe^Jane"))
    demo = app_module.create_demo(service=service)
    with caplog.at_level("DEBUG"):
        demo([path], api_name="predict_files")
    assert "Doe" not in caplog.text and "PID-" not in caplog.text


# --------------------------------------------------------------------------------------------------
# The class-activation map (serving.overlay), from the artefact's `cam` output


def cam_of(service, grey: np.ndarray):
    (prediction,) = service.predictor.predict([("x", factory.png(grey))], with_cam=True)
    assert prediction.scored and prediction.cam is not None and prediction.cam.ndim == 2
    return prediction


def test_heatmap_has_the_image_shape_and_unit_range(service):
    grey = factory.xray()[:, 20:190]  # not square, not the model's input size
    prediction = cam_of(service, grey)
    assert (prediction.grey == grey).all()  # the decoded image travels with the CAM, for the overlay
    for towards in (True, False):
        heat = heatmap(prediction.cam, grey.shape, towards, service.predictor.decision.crop)
        assert heat.shape == grey.shape and heat.dtype == np.float32
        assert 0.0 <= heat.min() and heat.max() <= 1.0
        picture = overlay(grey, heat)
        assert picture.shape == (*grey.shape, 3) and picture.dtype == np.uint8


def test_heatmap_peak_is_one_unless_the_map_is_empty(service):
    crop = service.predictor.decision.crop
    for grey in (factory.xray(), factory.ramp(300, 200)):
        cam = cam_of(service, grey).cam
        for towards in (True, False):
            assert heatmap(cam, grey.shape, towards, crop).max() in (0.0, 1.0)
    # Each direction shows its own evidence only: positive cells towards pneumonia, negative ones away.
    cam = np.array([[-2.0, -0.5], [-1.0, -3.0]], dtype=np.float32)
    assert heatmap(cam, (50, 40), towards_pneumonia=True).max() == 0.0
    assert heatmap(cam, (50, 40), towards_pneumonia=False).max() == 1.0
    assert heatmap(np.zeros((3, 3), dtype=np.float32), (50, 40), True).max() == 0.0
    single = np.zeros((7, 7), dtype=np.float32)
    single[3, 3] = 0.01  # one weak cell: still the strongest evidence there is
    assert heatmap(single, (99, 99), True).max() == 1.0


def test_heatmap_covers_only_the_region_the_network_sees():
    heat = heatmap(np.ones((4, 4), dtype=np.float32), (100, 80), True, crop=0.8)
    inner = heat[10:90, 8:72]
    assert inner.min() == 1.0 and heat.max() == 1.0
    outside = heat.copy()
    outside[10:90, 8:72] = 0.0
    assert not outside.any()


def test_overlay_leaves_the_image_alone_where_the_heatmap_is_zero():
    grey = factory.xray()
    picture = overlay(grey, np.zeros(grey.shape, dtype=np.float32))
    assert (picture == grey[..., np.newaxis]).all()
    heat = np.zeros(grey.shape, dtype=np.float32)
    heat[:, 112:] = 1.0
    picture = overlay(grey, heat)
    assert (picture[:, :112] == grey[:, :112, np.newaxis]).all()
    assert (picture[:, 112:] != grey[:, 112:, np.newaxis]).any()  # coloured where the heat is
    with pytest.raises(ValueError):
        overlay(grey, np.zeros((3, 3), dtype=np.float32))


def test_app_overlay_is_the_map_for_its_decision(app_module, service):
    outcome = app_results.predict_files([str(EXAMPLES[0])], service)
    (result,) = outcome.results
    prediction = cam_of(service, decode_greyscale(EXAMPLES[0].read_bytes()))
    towards = result.label == CLASS_NAMES[1]
    expected = overlay(prediction.grey, heatmap(prediction.cam, prediction.grey.shape, towards,
                                                service.predictor.decision.crop))
    assert (outcome.overlay == expected).all()


def test_large_images_get_an_overlay_of_bounded_size(app_module, service, tmp_path):
    big = np.asarray(Image.fromarray(factory.xray()).resize((800, 1000)))  # 1000 high, 800 wide
    outcome = app_results.predict_files([write(tmp_path, "big.png", factory.png(big))], service)
    side = OVERLAY_MAX_SIDE
    assert outcome.overlay.shape == (side, round(800 * side / 1000), 3)


def test_the_map_comes_from_the_one_model_run_that_scores(app_module, service, monkeypatch, tmp_path):
    """(Replaces the TensorFlow Grad-CAM "traced once" check: the CAM is an output of the same ONNX
    run as the probabilities, so a request costs one model run, whatever the number of files.)"""
    artefact = service.predictor.artefact
    calls = []
    real = artefact.run

    def counting(images, with_cam=False):
        if len(images):  # the (empty) second pass for turned X-rays runs nothing
            calls.append((len(images), with_cam))
        return real(images, with_cam)

    monkeypatch.setattr(artefact, "run", counting)
    paths = [str(path) for path in EXAMPLES] + [write(tmp_path, "notes.txt", b"not an image")]
    outcome = app_results.predict_files(paths, service)
    assert calls == [(len(EXAMPLES), True)]
    # With the CAM or without it, the same probabilities.
    plain = service.predictor.predict_paths([Path(p) for p in paths])
    assert [r.probability for r in outcome.results] == pytest.approx([r.probability for r in plain], abs=1e-6)


# --------------------------------------------------------------------------------------------------
# Start-up: the model loads once, on first use; no model still gives a working page


def test_model_loads_once_on_first_use_not_per_request(app_module, tiny_bundle, monkeypatch):
    calls = []
    real = service_module.load_artefact
    monkeypatch.setattr(service_module, "load_artefact", lambda uri: calls.append(uri) or real(uri))
    service = app_module.ModelService(str(tiny_bundle))
    demo = app_module.create_demo(service)
    assert calls == []  # building the app loads nothing
    for _ in range(3):
        demo(str(EXAMPLES[0]), api_name="predict")
    assert calls == [str(tiny_bundle)]
    assert service.load() is service and calls == [str(tiny_bundle)]


def test_concurrent_first_requests_load_the_model_once(app_module, tiny_bundle, monkeypatch):
    calls = []
    real = service_module.load_artefact

    def slow_load(uri):
        calls.append(uri)
        time.sleep(0.2)  # a wide window for a second loader to slip in
        return real(uri)

    monkeypatch.setattr(service_module, "load_artefact", slow_load)
    service = app_module.ModelService(str(tiny_bundle))
    with concurrent.futures.ThreadPoolExecutor(4) as callers:
        ready = list(callers.map(lambda _: service.ready, range(4)))
    assert ready == [True] * 4 and calls == [str(tiny_bundle)]


def test_unreadable_model_file_becomes_a_message_not_a_crash(app_module, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / ARTEFACT_NAME).write_bytes(b"not an ONNX model")
    service = app_module.ModelService(str(folder)).load()
    assert not service.ready and str(folder) in service.problem
    assert "corrupt" in service.problem and "make repro" in service.problem
    with pytest.raises(ModelUnavailableError):
        app_results.predict_files([str(EXAMPLES[0])], service)
    assert "No model is loaded" in app_results.model_panel(service)
    # A folder with no artefact at all says so.
    empty = app_module.ModelService(str(tmp_path)).load()
    assert not empty.ready and ARTEFACT_NAME in empty.problem


@pytest.fixture(scope="module")
def no_model_service(app_module, tmp_path_factory):
    """The app's service where the model URI names no exported model (no MLflow involved: fast)."""
    return app_module.ModelService(str(tmp_path_factory.mktemp("exports") / "not-exported")).load()


@pytest.fixture(scope="module")
def no_registered_model_service(app_module, tmp_path_factory):
    """The app's service where the MLflow store (a new, empty one) has no production model."""
    store = tmp_path_factory.mktemp("empty-store") / "mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store.as_posix()}")
        return app_module.ModelService("models:/pneumonia-cnn@production").load()


def page_load(demo):
    """The page-load event's function: (model panel, Screen button, no-model banner) updates."""
    return next(event.fn for event in demo.fns.values() if getattr(event.fn, "__name__", "") == "on_page_load")


@pytest.mark.slow  # imports MLflow and creates its store: about 5 s
def test_no_registered_model_explains_how_to_train(app_module, no_registered_model_service):
    service = no_registered_model_service
    assert not service.ready
    assert "make repro" in service.problem and "models:/pneumonia-cnn@production" in service.problem
    with pytest.raises(ModelUnavailableError):
        app_results.predict_files([str(EXAMPLES[0])], service)
    assert app_results.predict_files([], service).status == app_results.UPLOAD_PROMPT  # a cleared box
    assert "make repro" in app_results.model_panel(service)
    assert app_results.no_model_message(service).count("make repro") == 1  # the remedy, said once


@pytest.mark.slow  # imports MLflow
def test_corrupt_mlflow_store_becomes_a_message_not_a_crash(app_module, tmp_path, monkeypatch):
    store = tmp_path / "mlflow.db"
    store.write_bytes(b"not an SQLite database\n" * 200)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store.as_posix()}")
    service = app_module.ModelService("models:/pneumonia-cnn@production").load()  # "never raises"
    assert not service.ready and "mlflow.db" in service.problem


def test_missing_model_explains_how_to_train(app_module, no_model_service):
    assert not no_model_service.ready
    assert "not-exported" in no_model_service.problem
    with pytest.raises(ModelUnavailableError):
        app_results.predict_files([str(EXAMPLES[0])], no_model_service)
    assert app_results.predict_files([], no_model_service).status == app_results.UPLOAD_PROMPT  # a cleared box
    assert "make repro" in app_results.model_panel(no_model_service)
    assert "make repro" in app_results.no_model_message(no_model_service)


def test_model_panel_shows_the_card(app_module, service, tiny_bundle):
    panel = app_results.model_panel(service)
    for shown in ("tiny-test-model version 7", "2023-11-14 22:13 UTC", "`0123abc`", "50.0% probability of pneumonia",
                  "(0.5000 in the JSON)", "Youden's index", "calibration: platt", "12 images",
                  "| ROC-AUC | 0.610 | 0.420 to 0.800 |", NOT_A_DEVICE, "Served from `exported folder tiny` (version 7)"):
        assert shown in panel, shown
    assert "uncommitted" not in panel  # the commit is clean
    assert str(tiny_bundle.parent) not in panel  # the page names the folder, not the server's paths
    panel_update, button, banner = page_load(app_module.create_demo(service))()
    assert panel_update["value"] == panel
    assert button["interactive"] is True and banner["visible"] is False


def test_page_without_a_model_says_why_and_disables_screening(app_module, no_model_service):
    panel, button, banner = page_load(app_module.create_demo(no_model_service))()
    assert "No model is loaded" in panel["value"] and "make repro" in panel["value"]
    assert button["interactive"] is False
    assert banner["visible"] is True and no_model_service.problem in banner["value"]


def test_parse_args_defaults_and_environment(app_module, monkeypatch, tmp_path):
    for name in ("GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT", "GRADIO_SHARE", "PNEUMONIA_MODEL_URI",
                 "PNEUMONIA_MAX_FILE_MB"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(app_module, "SHIPPED_MODEL_DIR", tmp_path / "model")
    defaults = app_module.parse_args([])
    assert (defaults.host, defaults.port, defaults.share, defaults.model_uri, defaults.max_file_mb) == (
        "127.0.0.1", 7860, False, None, 50)
    assert defaults.max_file_mb * 1e6 == MAX_FILE_BYTES  # the one limit of every client
    with pytest.raises(SystemExit):  # a deployment may lower the limit, never raise it
        app_module.parse_args(["--max-file-mb", "60"])
    # A model exported beside the app (as on a Space) is the default when there is one.
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / ARTEFACT_NAME).write_bytes(b"")
    assert app_module.parse_args([]).model_uri == str(tmp_path / "model")
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "9000")
    monkeypatch.setenv("GRADIO_SHARE", "true")
    monkeypatch.setenv("PNEUMONIA_MODEL_URI", "exports/model")
    monkeypatch.setenv("PNEUMONIA_MAX_FILE_MB", "5")
    from_env = app_module.parse_args([])
    assert (from_env.host, from_env.port, from_env.share, from_env.model_uri, from_env.max_file_mb) == (
        "0.0.0.0", 9000, True, "exports/model", 5)
    flags = app_module.parse_args(["--host", "127.0.0.2", "--port", "8000", "--model-uri", "models:/m/2"])
    assert (flags.host, flags.port, flags.model_uri) == ("127.0.0.2", 8000, "models:/m/2")


def test_module_level_demo_is_bounded_and_cleans_its_cache(app_module):
    demo = app_module.demo
    assert demo.delete_cache == server_page.DELETE_CACHE  # its queue's bounds: the two tests above
    assert not demo.analytics_enabled


# --------------------------------------------------------------------------------------------------
# The launched app, through gradio_client and plain HTTP


@pytest.fixture(scope="module")
def live_app(app_module, service) -> Iterator[tuple[str, object]]:
    demo = app_module.create_demo(service=service, max_file_bytes=100_000)
    url = launched(demo, **app_module.launch_options(demo, 100_000))
    try:
        yield url, client_for(url)
    finally:
        demo.close()


def test_client_prediction_through_the_named_endpoint(live_app, service):
    from gradio_client import handle_file

    _, client = live_app
    result, heatmap_path, table, status, details = client.predict(handle_file(str(EXAMPLES[0])),
                                                                  api_name="/predict")
    expected = probability_of(service, EXAMPLES[0].read_bytes())
    assert f"probability of pneumonia {expected:.1%}" in result and result.startswith("### ")
    with Image.open(heatmap_path) as image:
        assert image.size == (224, 224) and image.mode == "RGB"
    assert table["headers"] == ["file", "result", "probability of pneumonia", "note"]
    assert table["data"][0][0] == EXAMPLES[0].name and table["data"][0][2] == f"{expected:.1%}"
    assert "Scored 1 of 1 file" in status
    assert details == expected_details(service, [(EXAMPLES[0].name, EXAMPLES[0], None)])


def test_client_several_files_give_a_table(live_app, tmp_path):
    from gradio_client import handle_file

    _, client = live_app
    bad = write(tmp_path, "notes.txt", b"not an image")
    files = [handle_file(str(path)) for path in EXAMPLES] + [handle_file(bad)]
    result, _, table, status, details = client.predict(files, api_name="/predict_files")
    assert [row[0] for row in table["data"]] == [path.name for path in EXAMPLES] + ["notes.txt"]
    assert all(row[2].endswith("%") and row[1] != "Not scored" for row in table["data"][:-1])
    assert table["data"][-1][1:3] == ["Not scored", ""] and "not a recognised image" in table["data"][-1][3]
    assert result and f"Scored {len(EXAMPLES)} of {len(EXAMPLES) + 1} files" in status
    assert [entry["name"] for entry in details["results"]] == [row[0] for row in table["data"]]
    assert all(0.0 <= entry["probability_pneumonia"] <= 1.0 for entry in details["results"][:-1])
    assert table["data"][-1][3].startswith(details["results"][-1]["error"])


def test_client_non_image_gets_our_message(live_app, service, tmp_path):
    from gradio_client import handle_file

    _, client = live_app
    path = write(tmp_path, "report.pdf", b"%PDF-1.4 not really\n" * 10)
    result, heatmap_path, table, status, details = client.predict(handle_file(path), api_name="/predict")
    assert result == "" and heatmap_path is None
    row = table["data"][0]
    assert row[0] == "report.pdf" and "not a recognised image (expected PNG, JPEG or DICOM). Choose the chest X-ray" in row[3]
    assert "Scored 0 of 1 file" in status
    message = "not a recognised image (expected PNG, JPEG or DICOM)"
    assert details == expected_details(service, [("report.pdf", None, message)])


def test_a_file_over_the_limit_gets_a_row_and_only_the_ceiling_is_refused(live_app, tmp_path):
    url, client = live_app
    noise = np.random.default_rng(1).integers(0, 256, (400, 400), dtype=np.uint8)
    big = write(tmp_path, "big.png", factory.png(noise))
    assert 100_000 < Path(big).stat().st_size < 500_000
    from gradio_client import handle_file

    # Over the app's 0.1 MB limit but under Gradio's ceiling: its own row, and the other file is scored.
    _, _, table, status, _ = client.predict([handle_file(big), handle_file(str(EXAMPLES[0]))],
                                            api_name="/predict_files")
    assert re.match(r"file is 0\.1\d* MB, over the 0\.1 MB limit\. Export", table["data"][0][3])
    assert table["data"][1][2].endswith("%") and "Scored 1 of 2 files" in status
    # Over Gradio's ceiling (5 x the limit) the server itself answers 413, before anything is stored.
    huge = write(tmp_path, "huge.png", bytes(600_000))
    with open(huge, "rb") as handle:
        response = httpx.post(f"{url.rstrip('/')}/gradio_api/upload", files={"files": ("huge.png", handle)})
    assert response.status_code == 413


def test_page_and_api_are_served(live_app):
    url, client = live_app
    page = httpx.get(url)
    assert page.status_code == 200
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/predict", "/predict_files"} <= set(api)
    for name in ("/predict", "/predict_files"):
        endpoint = api[name]
        # Named inputs and outputs, the structured result described, an example from examples/ (offline).
        assert [p["label"] for p in endpoint["parameters"]] in (["Chest X-ray (PNG, JPEG or DICOM)"],
                                                               ["Chest X-rays (PNG, JPEG or DICOM)"])
        assert [p["parameter_name"] for p in endpoint["parameters"]] == ["paths"]
        assert [r["label"] for r in endpoint["returns"]] == [
            "Result of the selected file", "Where the model looked (not where a lesion is)",
            "All files (choose a row)", "Summary", "Structured result (JSON)"]
        assert "probability_pneumonia" in endpoint["description"] and "fractions" in endpoint["description"]
        example = json.dumps(endpoint["parameters"][0]["example_input"])
        assert f'"url": "examples/{EXAMPLES[0].name}"' in example and "http" not in example
    config = httpx.get(f"{url.rstrip('/')}/config").json()
    elem_ids = {component["props"].get("elem_id") for component in config["components"]}
    assert {"heatmap", "result-label", "results", "status", "details", "model-card", "upload"} <= elem_ids


def test_app_without_a_model_starts_and_says_how_to_train(app_module, no_model_service):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    demo = app_module.create_demo(service=no_model_service)
    url = launched(demo)
    try:
        assert httpx.get(url).status_code == 200
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
    score = server_page.score_and_render

    def recording(*args):
        seen.add(threading.current_thread().name)
        return score(*args)

    monkeypatch.setattr(server_page, "score_and_render", recording)
    demo = app_module.create_demo(service=service)
    on_predict = next(event.fn for event in demo.fns.values() if event.api_name == "predict")
    with concurrent.futures.ThreadPoolExecutor(4) as callers:
        answers = list(callers.map(lambda _: on_predict(str(EXAMPLES[0])), range(8)))
    assert all(answer[0] for answer in answers) and len(seen) == 1 and seen.pop().startswith("model")
