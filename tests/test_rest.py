"""`POST /api/v1/predict` (serving/rest.py): the CLI's rows for the same files, the refusals with their
statuses and one-line reasons, batching that keeps each request's results its own, the OpenAPI schema, and
(as a real `python app.py`) the route on the app's port with nothing uploaded written to disk or logged."""

from __future__ import annotations

import asyncio
import csv
import http.client
import logging
import os
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import httpx
import numpy as np
import pytest
from PIL import Image

from scoring import pixels
from scoring.pixels import MAX_FILE_BYTES
from scoring.runtime import RECORD_FIELDS, RECORD_TYPES, Prediction
from serving import rest
from tests import image_factory as factory
from tests.helpers import EXAMPLES, FIXTURE_DATASET, PROJECT, launched, write

TOLERANCE = 1e-6


def serve(service, app_module) -> tuple[gr.Blocks, str]:
    """A Gradio app with the REST route beside it, at the app's own limits."""
    with gr.Blocks() as demo:
        gr.Markdown("REST test")
    routes = rest.routes(service, MAX_FILE_BYTES, app_module.MAX_FILES)
    return demo, launched(demo, app_kwargs={"routes": routes})


@pytest.fixture(scope="module")
def api(service, app_module):
    demo, url = serve(service, app_module)
    with httpx.Client(base_url=url, timeout=60) as client:
        yield client
    demo.close()


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> list[Path]:
    """X-rays, plus files the checks refuse: text, an empty file, a truncated PNG."""
    folder = tmp_path_factory.mktemp("samples")
    bad = {"notes.txt": b"not an image", "empty.png": b"", "truncated.png": EXAMPLES[0].read_bytes()[:200]}
    for name, data in bad.items():
        (folder / name).write_bytes(data)
    return [*EXAMPLES, *sorted(FIXTURE_DATASET.rglob("*.jpeg"))[:5], *(folder / name for name in bad)]


def as_uploads(paths: list[Path]) -> list[tuple[str, tuple[str, bytes]]]:
    return [("files", (path.name, path.read_bytes())) for path in paths]


def post(api: httpx.Client, files=None, **options) -> httpx.Response:
    return api.post(rest.PATH, files=files, **options)


def cli_rows(paths: list[Path], bundle: Path, output: Path) -> list[dict[str, str]]:
    command = [sys.executable, "-m", "pipeline.predict", *map(str, paths), "--model-uri", str(bundle),
               "--output", str(output)]
    result = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode in (0, 1), result.stderr  # 1: some files refused, as intended here
    with output.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def assert_same_record(cli: dict[str, str], api: dict) -> None:
    assert Path(cli["path"]).name == api["name"]
    for name in RECORD_FIELDS:
        if cli[name] == "":
            assert api[name] is None, name
        elif RECORD_TYPES[name] == "double":
            assert abs(float(cli[name]) - api[name]) <= TOLERANCE, name
        else:
            assert cli[name] == api[name], name


def assert_refused(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    reason = response.json()["detail"]
    assert "\n" not in reason and all(word in reason for word in words), reason


# --------------------------------------------------------------------------------------------------
# Answers


def test_rows_match_the_cli_for_the_same_files(api, samples, tiny_bundle, tmp_path):
    expected = cli_rows(samples, tiny_bundle, tmp_path / "cli.csv")
    response = post(api, as_uploads(samples))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == {"name": "tiny-test-model", "version": "7", "threshold": 0.5}
    assert [set(row) for row in body["results"]] == [{"name", *RECORD_FIELDS}] * len(samples)
    for cli, row in zip(expected, body["results"], strict=True):
        assert_same_record(cli, row)


def test_bad_files_get_the_very_same_error_text_from_the_cli_and_the_route(api, tiny_bundle, tmp_path):
    """What a person reads about a bad file is one text (scoring.wording and the scoring core's own
    refusals): the predict CLI's `error` column and the route's `error` are the same bytes for a text file
    named .png, a truncated JPEG and a colour photo."""
    jpeg = min(FIXTURE_DATASET.rglob("*.jpeg")).read_bytes()
    photo = np.zeros((240, 320, 3), dtype=np.int16)  # a sky over a meadow, with some texture
    photo[:120], photo[120:] = (70, 140, 230), (40, 160, 50)
    photo = np.clip(photo + np.random.default_rng(3).integers(-25, 25, photo.shape), 0, 255).astype(np.uint8)
    bad = {"notes.png": (b"Patient notes: not an image at all.\n" * 20, "not a recognised image"),
           "truncated.jpeg": (jpeg[: len(jpeg) // 2], "truncated"),
           "holiday-photo.jpg": (factory.encode(Image.fromarray(photo), "JPEG", quality=90), "strongly coloured")}
    paths = [Path(write(tmp_path, name, data)) for name, (data, _) in bad.items()]
    rows = cli_rows(paths, tiny_bundle, tmp_path / "cli.csv")
    response = post(api, as_uploads(paths))
    assert response.status_code == 200, response.text
    for (name, (_, words)), cli, answer in zip(bad.items(), rows, response.json()["results"], strict=True):
        assert answer["name"] == name and Path(cli["path"]).name == name
        assert words in answer["error"] and cli["error"].encode("utf-8") == answer["error"].encode("utf-8"), name


def test_a_refused_file_gets_its_error_in_its_row_and_the_others_are_scored(api):
    response = post(api, [("files", ("notes.txt", b"plain text")), *as_uploads(EXAMPLES[:1])])
    assert response.status_code == 200
    refused, scored = response.json()["results"]
    assert refused["error"] and refused["probability_pneumonia"] is None and refused["label"] is None
    assert scored["error"] is None and 0 <= scored["probability_pneumonia"] <= 1 and scored["label"]


def test_requests_scored_together_each_get_their_own_results(api):
    # Concurrent requests are batched on the scoring threads; each must get back its own files, in order,
    # with the scores they get alone.
    requests = [[EXAMPLES[i % 3], EXAMPLES[(i + 1) % 3]][: 1 + i % 2] for i in range(12)]
    alone = {path.name: post(api, as_uploads([path])).json()["results"][0] for path in EXAMPLES}
    with ThreadPoolExecutor(max_workers=12) as pool:
        responses = list(pool.map(lambda paths: post(api, as_uploads(paths)), requests))
    for paths, response in zip(requests, responses, strict=True):
        rows = response.json()["results"]
        assert [row["name"] for row in rows] == [path.name for path in paths]
        for row in rows:
            assert abs(row["probability_pneumonia"] - alone[row["name"]]["probability_pneumonia"]) <= TOLERANCE


def test_a_second_scoring_thread_scores_while_the_first_is_busy():
    # While one batch is in the network, the next request is scored beside it, not after it.
    first_running, both_running = threading.Event(), threading.Barrier(2, timeout=20)

    class Predictor:
        def predict(self, items, max_bytes):
            first_running.set()
            both_running.wait()  # broken (an error) unless two batches are scored at the same time
            return [Prediction(name, 0.5, "NORMAL", 0.5) for name, _ in items]

    scorer = rest.BatchScorer(SimpleNamespace(predictor=Predictor()), 1024)
    assert scorer.threads == rest.MODEL_THREADS == 2

    async def two_requests():
        first = asyncio.ensure_future(scorer.score([("first.png", b"")]))
        await asyncio.to_thread(first_running.wait, 20)
        return await asyncio.gather(first, scorer.score([("second.png", b"")]))

    with ThreadPoolExecutor(max_workers=1) as pool:  # its own event loop, whatever runs in this thread
        first, second = pool.submit(asyncio.run, two_requests()).result()
    assert [p.name for p in first] == ["first.png"] and [p.name for p in second] == ["second.png"]


# --------------------------------------------------------------------------------------------------
# Refusals


def test_no_files_is_400(api):
    assert_refused(post(api, [("comment", ("note.txt", b"a file in another field"))]), 400, "no files")
    # What an HTML form sends for a file input left empty: a part with no name and no bytes.
    assert_refused(post(api, [("files", ("", b""))]), 400, "no files")


def test_a_body_that_is_not_multipart_is_400(api):
    assert_refused(post(api, json={"files": ["x.png"]}), 400, "multipart/form-data", "files")


def test_more_files_than_the_app_takes_is_413(api, app_module):
    files = as_uploads(EXAMPLES[:1]) * (app_module.MAX_FILES + 1)
    assert_refused(post(api, files), 413, f"at most {app_module.MAX_FILES} files", str(app_module.MAX_FILES + 1))
    assert post(api, files[:app_module.MAX_FILES]).status_code == 200


def test_a_file_over_the_apps_limit_is_413(api, app_module):
    limit = MAX_FILE_BYTES
    files = [*as_uploads(EXAMPLES[:1]), ("files", ("huge.png", b"\0" * (limit + 1)))]
    assert_refused(post(api, files), 413, "'huge.png'", "limit per file")


def test_a_body_declared_larger_than_all_files_together_is_413_before_it_is_read(api):
    connection = http.client.HTTPConnection(api.base_url.host, api.base_url.port, timeout=10)
    try:
        connection.putrequest("POST", rest.PATH)
        connection.putheader("Content-Type", "multipart/form-data; boundary=x")
        connection.putheader("Content-Length", str(10**12))
        connection.endheaders()  # no body follows: the answer must not wait for it
        response = connection.getresponse()
        assert response.status == 413 and b"request body is larger" in response.read()
    finally:
        connection.close()


def test_the_per_file_limit_is_the_apps_within_what_the_decoder_takes():
    assert rest.Limits.of_app(16, 10**12).max_file_bytes == pixels.MAX_FILE_BYTES
    assert rest.Limits.of_app(16, 1000).max_file_bytes == 1000


def test_no_model_is_503_with_the_reason(app_module, tmp_path):
    demo, url = serve(app_module.ModelService(str(tmp_path / "no-such-model")), app_module)
    try:
        response = httpx.post(url + rest.PATH.lstrip("/"), files=as_uploads(EXAMPLES[:1]), timeout=60)
        assert_refused(response, 503, "no model is loaded")
    finally:
        demo.close()


def test_the_openapi_schema_documents_the_route(api, app_module):
    operation = api.get("/openapi.json").json()["paths"][rest.PATH]["post"]
    upload = operation["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]["files"]
    assert upload["maxItems"] == app_module.MAX_FILES and upload["items"]["format"] == "binary"
    assert {"200", "400", "413", "503"} <= set(operation["responses"])


def test_uploads_stay_in_memory_and_out_of_the_log(api, monkeypatch, caplog):
    # Over Starlette's 1 MB threshold, its form parser would roll the file over to tempfile.TemporaryFile.
    opened = []
    for name in ("TemporaryFile", "NamedTemporaryFile", "mkstemp", "mkdtemp"):
        original = getattr(tempfile, name)
        monkeypatch.setattr(tempfile, name, lambda *a, _original=original, _name=name, **k: (
            opened.append(_name), _original(*a, **k))[1])
    name = "Doe^Jane-in-memory.png"
    with caplog.at_level(logging.DEBUG):
        response = post(api, [("files", (name, EXAMPLES[0].read_bytes() + os.urandom(3_000_000)))])
    assert response.status_code == 200 and response.json()["results"][0]["name"] == name
    assert opened == []
    assert "Doe^Jane" not in caplog.text


# --------------------------------------------------------------------------------------------------
# The real app


@pytest.mark.slow
def test_the_app_serves_the_route_without_writing_or_logging_uploads(tiny_bundle, tmp_path):
    from tests.test_app_process import cached_files, start_app

    process, url = start_app(tiny_bundle, tmp_path / "tmp")
    try:
        before = set(cached_files(tmp_path / "tmp"))
        # Over Starlette's 1 MB spooling threshold: a form parser that spooled would write it to TMPDIR.
        name = "Doe^Jane-rest-upload.png"
        big = EXAMPLES[0].read_bytes() + os.urandom(3_000_000)
        response = httpx.post(url + rest.PATH.lstrip("/"), timeout=60,
                              files=[("files", (name, big)), *as_uploads(EXAMPLES[:1])])
        assert response.status_code == 200, response.text
        assert [row["name"] for row in response.json()["results"]] == [name, EXAMPLES[0].name]
        assert set(cached_files(tmp_path / "tmp")) == before
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=60)
    assert "Doe^Jane" not in output and "rest-upload" not in output, output[-2000:]
