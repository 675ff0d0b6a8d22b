"""Every input of the hostile corpus (tests/hostile_corpus.py) gets its expected outcome, quickly, on every
surface: the app's prediction function, the shared `scoring.runtime.Predictor`, the launched app over HTTP
(gradio_client), and the batch predict CLI in a subprocess. Plus a bounded fuzz of the app's function on
mutated real X-rays.

No training: a tiny untrained CNN, exported as an ONNX serving artefact (the `tiny_bundle` fixture), stands
in for the model. Its scores mean nothing; outcomes, messages, ranges and timings are what is tested.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from PIL import Image

from scoring import checks
from scoring.decision import CLASS_NAMES
from scoring.imaging import MAX_FILE_BYTES, ImageDecodeError, decode_greyscale, read_bytes
from serving import results as app_results
from tests import image_factory as factory
from tests.helpers import KERAS_SAVE_WARNING, PROJECT, client_for, column, launched
from tests.hostile_corpus import ERROR, PREDICTION, Case, build_corpus, damaged, fixture_xray

pytestmark = [
    pytest.mark.filterwarnings(KERAS_SAVE_WARNING),
    pytest.mark.filterwarnings("ignore::UserWarning"),  # PIL and pydicom describe the damage they see
    pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning"),
    pytest.mark.filterwarnings("ignore::Warning:gradio.queueing"),  # Gradio's own pandas deprecations
]

PROJECT_ROOT = PROJECT
SECONDS_PER_INPUT = 5.0
SERVER_CAP = 2_000_000  # bytes; the test server's max_file_size (every corpus file but one is under it)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Case]:
    return build_corpus(tmp_path_factory.mktemp("hostile") / "corpus")


def _report(failures: list[str]) -> None:
    assert not failures, f"{len(failures)} corpus input(s) went wrong:\n" + "\n".join(failures)


def _checked(case: Case, probability, message, failures: list[str]) -> None:
    try:
        case.check(probability, message)
    except AssertionError as error:
        failures.append(str(error))


# --------------------------------------------------------------------------------------------------
# The corpus itself


def test_corpus_is_large_and_varied(corpus):
    assert len(corpus) >= 30
    outcomes = {case.outcome for case in corpus}
    assert outcomes == {PREDICTION, ERROR}
    assert all(case.message for case in corpus if case.outcome == ERROR)
    names = {case.name for case in corpus}
    for needed in ("empty.png", "random.png", "random.jpg", "truncated.jpeg", "truncated.png", "one-pixel.png",
                   "bomb-20000x20000.png", "animated.gif", "multipage.tiff", "sixteen-bit-full-range.png",
                   "cmyk.jpg", "exif-rotated.jpg", "drawing.svg", "report.pdf", "archive.zip", "no-pixel-data.dcm",
                   "jpeg2000-compressed.dcm", "mono1.dcm", "huge-header.dcm", "oversize.png",
                   "röntgen 胸部 ..%2Fetc%2Fpasswd.png", "-rf --output=pwned.png", "line\nbreak.png"):
        assert needed in names, needed
    oversize = next(case for case in corpus if case.name == "oversize.png")
    assert oversize.path.stat().st_size > MAX_FILE_BYTES
    assert {case.name for case in corpus if case.by_checks} == {"wide-10000x40.png", "uniform-grey.png",
                                                                "colour-noise.png"}


def test_refusals_come_from_the_decoder_or_from_serving_checks(corpus):
    """Each refusal has one owner: the decoder (scoring.imaging) for what is not a usable image, the
    plausibility checks (scoring.checks) for images that are implausible as chest X-rays."""
    failures = []
    for case in corpus:
        try:
            data = read_bytes(case.path)
            grey = decode_greyscale(data)
        except ImageDecodeError as error:
            if case.outcome != ERROR or case.by_checks or case.message.lower() not in str(error).lower():
                failures.append(f"{case.name}: refused by the decoder: {error}")
            continue
        problem = checks.implausibility(data, grey)
        if case.by_checks:
            if not problem or case.message.lower() not in problem.lower():
                failures.append(f"{case.name}: decoded, but scoring.checks said {problem!r}")
        elif case.outcome == ERROR or problem is not None:
            failures.append(f"{case.name}: decoded, and scoring.checks said {problem!r}")
    _report(failures)


def test_message_just_over_the_cap_shows_two_different_sizes(tmp_path):
    # Rounded to 3 digits, MAX_FILE_BYTES + 1 used to read "file is 52.4 MB, over the 52.4 MB limit".
    path = tmp_path / "just-over.png"
    with path.open("wb") as handle:
        handle.truncate(MAX_FILE_BYTES + 1)
    with pytest.raises(ImageDecodeError) as caught:
        read_bytes(path)
    message = str(caught.value)
    assert f"{MAX_FILE_BYTES + 1:,} bytes" in message and f"{MAX_FILE_BYTES:,}-byte limit" in message


def test_undecodable_compressed_dicom_logs_no_traceback(corpus, caplog):
    # pydicom logs each failing decoder plugin with LOGGER.exception: a traceback in the app's and the
    # CLI's logs for a bad upload, until the DICOM decoder (now scoring.dicom) filtered it out.
    case = next(case for case in corpus if case.name == "jpeg2000-compressed.dcm")
    with caplog.at_level("DEBUG"), pytest.raises(ImageDecodeError, match="cannot be decoded"):
        decode_greyscale(case.path.read_bytes())
    assert not [record for record in caplog.records if record.levelno >= 40 or record.exc_info], caplog.text
    assert "Traceback" not in caplog.text


# --------------------------------------------------------------------------------------------------
# (a) The app's prediction function and the shared Predictor


def test_every_input_through_the_app_prediction_function(app_module, service, corpus):
    failures, timings = [], {}
    for case in corpus:
        started = time.perf_counter()
        outcome = app_results.predict_files([str(case.path)], service)
        timings[case.name] = time.perf_counter() - started
        (result,) = outcome.results
        assert result.name == str(case.path)
        # What the user sees names the file as it is, never as a path.
        assert column(outcome.table(), "file") == [case.name]
        assert [entry["name"] for entry in outcome.details["results"]] == [case.name]
        _checked(case, result.probability, result.error, failures)
        if result.probability is not None:
            assert result.label == service.predictor.decision.label(result.probability)
            assert outcome.result_text() and outcome.overlay is not None
        else:
            assert outcome.result_text() == "" and outcome.overlay is None
            assert "Scored 0 of 1 file" in outcome.status
    slow = {name: round(seconds, 2) for name, seconds in timings.items() if seconds > SECONDS_PER_INPUT}
    assert not slow, slow
    _report(failures)


def test_mixed_batches_keep_order_and_outcomes(app_module, service, corpus):
    failures = []
    for start in range(0, len(corpus), app_module.MAX_FILES):
        batch = corpus[start:start + app_module.MAX_FILES]
        outcome = app_results.predict_files([str(case.path) for case in batch], service)
        assert [r.name for r in outcome.results] == [str(case.path) for case in batch]
        assert column(outcome.table(), "file") == [case.name for case in batch]
        for case, result in zip(batch, outcome.results, strict=True):
            _checked(case, result.probability, result.error, failures)
    _report(failures)


def test_every_input_through_the_predictor(service, corpus):
    """The path every surface shares: Predictor.predict_paths (the app, the predict CLI) and
    Predictor.predict on file bytes (the MLflow model), with the same outcome either way."""
    predictor, failures = service.predictor, []
    for case in corpus:
        started = time.perf_counter()
        (by_path,) = predictor.predict_paths([case.path])
        assert time.perf_counter() - started < SECONDS_PER_INPUT, case.name
        assert by_path.name == str(case.path) and by_path.threshold == predictor.threshold
        _checked(case, by_path.probability, by_path.error, failures)
        if by_path.scored:
            assert by_path.label == predictor.decision.label(by_path.probability)
        else:
            assert by_path.label is None
        try:
            data = read_bytes(case.path)
        except ImageDecodeError:
            continue
        (by_bytes,) = predictor.predict([(case.name, data)])
        assert by_bytes.error == by_path.error, case.name
        if by_path.scored:
            assert by_bytes.probability == pytest.approx(by_path.probability, abs=1e-6), case.name
        else:
            assert by_bytes.probability is None, case.name
    _report(failures)


# --------------------------------------------------------------------------------------------------
# (b) The launched app, through gradio_client


@pytest.fixture(scope="module")
def live_app(app_module, service) -> Iterator[tuple[str, object]]:
    demo = app_module.create_demo(service=service, max_file_bytes=SERVER_CAP)
    url = launched(demo, max_file_size=SERVER_CAP)
    try:
        yield url, client_for(url)
    finally:
        demo.close()


@pytest.mark.slow  # the whole corpus over HTTP: 3 to 5 s, plus starting the server
def test_every_input_through_the_launched_app(live_app, corpus, app_module):
    from gradio_client import handle_file

    url, client = live_app
    uploadable = [case for case in corpus if case.path.stat().st_size <= SERVER_CAP]
    assert len(uploadable) == len(corpus) - 1
    failures = []
    for start in range(0, len(uploadable), app_module.MAX_FILES):
        batch = uploadable[start:start + app_module.MAX_FILES]
        started = time.perf_counter()
        label, heatmap, table, status, details = client.predict(
            [handle_file(str(case.path)) for case in batch], api_name="/predict_files")
        assert time.perf_counter() - started < SECONDS_PER_INPUT * len(batch)
        rows, entries = table["data"], details["results"]
        assert len(rows) == len(entries) == len(batch)
        for case, entry, row in zip(batch, entries, rows, strict=True):
            # Gradio stores uploads under a sanitised name; whatever it is, it is a bare name.
            assert entry["name"] == row[0] and entry["name"] and "/" not in entry["name"], entry["name"]
            _checked(case, entry["probability_pneumonia"], entry["error"], failures)
            if entry["probability_pneumonia"] is not None:
                assert entry["label"] in CLASS_NAMES and row[2].endswith("%")
            else:
                assert row[1] == "Not scored" and row[2] == ""
        scored = sum(entry["probability_pneumonia"] is not None for entry in entries)
        assert f"Scored {scored} of {len(batch)} files" in status
        assert bool(label) == (scored > 0) and (heatmap is not None) == (scored > 0)  # no label: None or {}
    _report(failures)
    # The server is still up and answering after the whole corpus.
    assert httpx.get(url).status_code == 200


@pytest.mark.slow  # shares the server above; test_app checks the 413 in the fast tier
def test_the_oversize_file_is_refused_clearly_and_the_app_goes_on(live_app, corpus):
    from gradio_client import handle_file

    url, client = live_app
    oversize = next(case for case in corpus if case.name == "oversize.png")
    with pytest.raises(ValueError, match="exceeds the maximum file size"):  # gradio_client, before sending
        client.predict([handle_file(str(oversize.path))], api_name="/predict_files")
    # Sent anyway, as a browser or a hand-written client would: the server answers 413, not a crash.
    head = oversize.path.read_bytes()[: SERVER_CAP + 1024]
    response = httpx.post(f"{url.rstrip('/')}/gradio_api/upload", files={"files": ("oversize.png", head)})
    assert response.status_code == 413
    good = next(case for case in corpus if case.name == "cmyk.jpg")
    *_, details = client.predict([handle_file(str(good.path))], api_name="/predict_files")
    assert 0.0 <= details["results"][0]["probability_pneumonia"] <= 1.0


# --------------------------------------------------------------------------------------------------
# (c) The batch predict CLI, one subprocess over the whole corpus


def test_every_input_through_the_predict_cli(corpus, tiny_bundle, tmp_path):
    from pipeline.predict import expand_paths

    folder = corpus[0].path.parent
    discovered = set(expand_paths([str(folder)]))
    # Folder scanning takes only known image suffixes; the rest are named one by one, so all get a row.
    named = [str(case.path) for case in corpus if case.path not in discovered]
    output = tmp_path / "out.csv"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONWARNINGS": "ignore"}
    started = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, "-m", "pipeline.predict", str(folder), *named, "--model-uri", str(tiny_bundle),
         "--output", str(output)],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=180, check=False,
    )
    elapsed = time.perf_counter() - started
    assert completed.returncode == 1, completed.stderr[-3000:]
    assert "Traceback" not in completed.stderr, completed.stderr[-3000:]
    with output.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    by_path = {row["path"]: row for row in rows}
    assert len(rows) == len(by_path) == len(corpus)
    assert set(by_path) == {str(case.path) for case in corpus}
    failures = []
    for case in corpus:
        row = by_path[str(case.path)]
        probability = float(row["probability_pneumonia"]) if row["probability_pneumonia"] else None
        _checked(case, probability, row["error"], failures)
        if probability is not None:
            assert row["label"] in CLASS_NAMES
        else:
            assert row["label"] == ""
    _report(failures)
    assert elapsed < 60 + SECONDS_PER_INPUT * len(corpus) / 10  # start-up + the inputs


# --------------------------------------------------------------------------------------------------
# Fuzz: mutated real X-rays through the app's function and the Predictor


def _fuzz_seeds() -> dict[str, bytes]:
    xray = fixture_xray(3)  # a real X-ray, from the fixtures
    return {
        "jpeg": factory.encode(Image.fromarray(xray), "JPEG", quality=85),
        "png": factory.png(xray),
        "png-16": factory.png(xray.astype(np.uint16) * 257),
        "cmyk": factory.encode(Image.fromarray(xray).convert("CMYK"), "JPEG", quality=85),
        "exif": factory.jpeg_with_orientation(xray, 6),
        "dicom": factory.dicom(xray.astype(np.uint16) * 16, window=(2000.0, 3000.0), rescale=(1.0, -1024.0)),
    }


FUZZ_SEEDS = _fuzz_seeds()
FUZZ_SKIP = 16


def damaged_xray():
    """A real X-ray file damaged past its first bytes (damaged signatures are test_imaging's fuzz)."""
    return damaged(FUZZ_SEEDS, edits=4, skip=FUZZ_SKIP, insert=32, delete=64)


@pytest.fixture(scope="module")
def fuzz_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "upload.bin"


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=damaged_xray())
def test_fuzz_app_function_agrees_with_predictor_and_never_raises(app_module, service, fuzz_file, data):
    fuzz_file.write_bytes(data)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcome = app_results.predict_files([str(fuzz_file)], service)
        (result,) = outcome.results
        (direct,) = service.predictor.predict([("upload.bin", data)])
    assert time.perf_counter() - started < SECONDS_PER_INPUT
    event("scored" if result.probability is not None else result.error.split(":")[0][:40])
    # The app accepts, refuses and scores exactly as the Predictor does, plausibility checks included.
    assert result.error == direct.error
    if result.probability is not None:
        assert 0.0 <= result.probability <= 1.0 and result.label in CLASS_NAMES
        assert direct.probability == pytest.approx(result.probability, abs=1e-6)
        assert direct.label == result.label
    else:
        assert result.error and direct.probability is None
