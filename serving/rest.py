"""REST scoring beside the Gradio page: `POST /api/v1/predict`, same process, port and loaded model.

    curl -F files=@xray1.png -F files=@xray2.dcm http://127.0.0.1:7860/api/v1/predict

The multipart field `files` carries 1 to `max_files` X-rays. The answer is JSON: the model (name, version,
threshold) and one result per file, in order, with the uploaded file's `name` and the fields the predict CLI
writes (`scoring.runtime.RECORD_FIELDS`); a file the checks refuse gets its error in its row. Refusals of the
whole request carry `{"detail": "<one-line reason>"}`: 400 (no files, not multipart), 413 (too many files, a
file over the limit, a body over the limit of all files together), 503 (no model).

Uploads stay in memory: the body is parsed here as it streams in (Starlette's own form parser would spool
any file over 1 MB to a temporary file on disk), each file's bytes are capped as they arrive, and nothing
about an upload (name, bytes, metadata) is logged. Files from requests that arrive together are scored as
one batch on one of two scoring threads (`MODEL_THREADS`), which on CPU gives several times the images/s of
one at a time.

Gradio builds its FastAPI app at launch, so the route reaches it through `launch(**launch_options(...))`
(FastAPI's `routes` argument, passed by Gradio's `app_kwargs`), beside the on-device page's routes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi.routing import APIRoute
from pydantic import BaseModel, create_model
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from scoring import pixels, wording
from scoring.runtime import BATCH_SIZE, RECORD_FIELDS, RECORD_TYPES, Prediction, answer
from serving.service import Served

log = logging.getLogger(__name__)

PATH = "/api/v1/predict"
FIELD = "files"
# Room for each part's boundary and headers, on top of its file's bytes, in the limit of a whole body.
PART_OVERHEAD_BYTES = 16 * 1024
# Two scoring threads: while one runs the network (ONNX Runtime releases the GIL), the other decodes and checks
# the next files, so the cores never wait on each other's work (docs/benchmarks.md).
MODEL_THREADS = 2
NO_STORE = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
JSON_TYPES = {"double": float, "string": str}
DESCRIPTION = (f"Multipart field `{FIELD}`: 1 to the app's limit of X-rays (PNG, JPEG or DICOM). One result per "
               "file, in order: its `name` and the fields the predict CLI writes; a file the checks refuse gets "
               "its `error` in its row. Nothing uploaded is written to disk or logged.")


class Refused(Exception):
    """A request refused as a whole: its HTTP status and a one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class ScoringFailed(RuntimeError):
    """The model failed on a batch (logged where it happened)."""

    def __init__(self) -> None:
        super().__init__("scoring failed unexpectedly; the error was logged on the server")


@dataclass(frozen=True)
class Limits:
    """What one request may carry: at most `max_files` files of at most `max_file_bytes` each."""

    max_files: int
    max_file_bytes: int

    @classmethod
    def of_app(cls, max_files: int, app_max_file_bytes: int) -> Limits:
        """The app's own limits, within what the decoder accepts at all (`scoring.pixels.MAX_FILE_BYTES`)."""
        return cls(max_files, min(app_max_file_bytes, pixels.MAX_FILE_BYTES))

    @property
    def max_body_bytes(self) -> int:
        return self.max_files * (self.max_file_bytes + PART_OVERHEAD_BYTES)

    def too_large(self, name: str) -> str:
        return f"{name!r}: {wording.too_large(None, self.max_file_bytes)} per file"

    def too_many(self, count: int) -> str:
        return f"at most {self.max_files} files per request; got {count}"

    def body_too_large(self) -> str:
        return (f"the request body is larger than {wording.megabytes(self.max_body_bytes)}: at most "
                f"{self.max_files} files of {wording.megabytes(self.max_file_bytes)}")

    def no_files(self) -> str:
        return f"no files: send 1 to {self.max_files} X-rays in the multipart field {FIELD!r}"


# --------------------------------------------------------------------------------------------------
# Reading the uploads, in memory


@dataclass
class _Part:
    disposition: bytes = b""
    header: bytes = b""
    value: bytes = b""
    is_file: bool = False
    name: str = ""
    data: bytearray = field(default_factory=bytearray)


class UploadReader:
    """The files of the `files` field of one multipart body, fed chunk by chunk, kept in memory within
    `limits`. Past a limit nothing more is kept; `files()` then refuses the request."""

    def __init__(self, boundary: bytes, limits: Limits) -> None:
        self.limits = limits
        self.received = 0
        self.count = 0
        self.problem: str | None = None
        self._files: list[tuple[str, bytes]] = []
        self._part = _Part()
        self._parser = MultipartParser(boundary, {
            "on_part_begin": self._begin, "on_header_field": self._header_field,
            "on_header_value": self._header_value, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished, "on_part_data": self._data, "on_part_end": self._end,
        })

    def feed(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.received > self.limits.max_body_bytes:
            raise Refused(413, self.limits.body_too_large())
        try:
            self._parser.write(chunk)
        except MultipartParseError as error:
            raise Refused(400, f"the multipart body could not be read: {error}") from None

    def files(self) -> list[tuple[str, bytes]]:
        """(file name, bytes) in the order sent; Refused when a limit was passed or there is no file."""
        try:
            self._parser.finalize()
        except MultipartParseError as error:
            raise Refused(400, f"the multipart body could not be read: {error}") from None
        if self.count > self.limits.max_files:
            raise Refused(413, self.limits.too_many(self.count))
        if self.problem:
            raise Refused(413, self.problem)
        if not self._files:
            raise Refused(400, self.limits.no_files())
        return self._files

    def _begin(self) -> None:
        self._part = _Part()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._part.header += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._part.value += data[start:end]

    def _header_end(self) -> None:
        if self._part.header.lower() == b"content-disposition":
            self._part.disposition = self._part.value
        self._part.header, self._part.value = b"", b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._part.disposition)
        if options.get(b"name", b"").decode("utf-8", "replace") != FIELD:
            return  # another field: read past, never kept
        self._part.name = options.get(b"filename", b"").decode("utf-8", "replace")
        self._part.is_file = True
        self.count += 1

    def _data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        if not part.is_file or self.problem or self.count > self.limits.max_files:
            return
        part.data += data[start:end]
        if len(part.data) > self.limits.max_file_bytes:
            self.problem = self.limits.too_large(part.name)
            part.data = bytearray()

    def _end(self) -> None:
        part = self._part
        if part.is_file and not self.problem and self.count <= self.limits.max_files and (part.name or part.data):
            self._files.append((part.name, bytes(part.data)))  # a form's empty file input sends neither
        self._part = _Part()


async def read_uploads(request: Request, limits: Limits) -> list[tuple[str, bytes]]:
    """The uploaded files of `request`, read as the body streams in; Refused (400/413) otherwise."""
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or not options.get(b"boundary"):
        raise Refused(400, f"send the X-rays as multipart/form-data, in the field {FIELD!r}")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise Refused(413, limits.body_too_large())
    reader = UploadReader(options[b"boundary"], limits)
    async for chunk in request.stream():
        reader.feed(chunk)
    return reader.files()


# --------------------------------------------------------------------------------------------------
# Scoring, batched across requests


@dataclass(frozen=True)
class _Job:
    items: list[tuple[str, bytes]]
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class BatchScorer:
    """`threads` scoring threads for the route. Whatever files are waiting when one comes free (up to
    `max_batch`) are scored together, and each request gets its own predictions back: alone, a request is
    scored at once; under load, the batches grow by themselves."""

    def __init__(self, service: Served, max_file_bytes: int, max_batch: int = BATCH_SIZE,
                 threads: int = MODEL_THREADS) -> None:
        self.service = service
        self.max_file_bytes = max_file_bytes
        self.max_batch = max_batch
        self.threads = threads
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._lock = threading.Lock()

    async def score(self, items: list[tuple[str, bytes]]) -> list[Prediction]:
        job = _Job(items)
        self._start()
        self._jobs.put(job)
        return await asyncio.wrap_future(job.future)

    def _start(self) -> None:
        with self._lock:
            if not self._workers:
                self._workers = [threading.Thread(target=self._serve, name=f"rest-model-{number}", daemon=True)
                                 for number in range(self.threads)]
                for worker in self._workers:
                    worker.start()

    def _serve(self) -> None:
        while True:
            self._run(self._waiting_jobs())

    def _waiting_jobs(self) -> list[_Job]:
        jobs: list[_Job] = []
        count = 0
        while count < self.max_batch:
            try:
                job = self._jobs.get(block=not jobs)
            except queue.Empty:
                break
            if job.future.set_running_or_notify_cancel():  # False: its client went away
                jobs.append(job)
                count += len(job.items)
        return jobs

    def _run(self, jobs: list[_Job]) -> None:
        items = [item for job in jobs for item in job.items]
        try:
            predictions = self.service.predictor.predict(items, max_bytes=self.max_file_bytes)
        except Exception:  # one broken batch must not stop the thread; logged without the files or names
            log.exception("REST scoring failed")
            for job in jobs:
                job.future.set_exception(ScoringFailed())
            return
        start = 0
        for job in jobs:
            job.future.set_result(predictions[start:start + len(job.items)])
            start += len(job.items)


# --------------------------------------------------------------------------------------------------
# The route


def refusal(status: int, reason: str) -> JSONResponse:
    return JSONResponse({"detail": reason}, status_code=status, headers=NO_STORE)


async def _ready(service: Served) -> bool:
    if service.predictor is not None:
        return True
    return await run_in_threadpool(lambda: service.ready)  # may load the model: off the event loop


def predict_endpoint(service: Served, limits: Limits):
    """The route's handler around the app's model service."""
    scorer = BatchScorer(service, limits.max_file_bytes)

    async def predict(request: Request) -> Response:
        if not await _ready(service):
            return refusal(503, wording.no_model(service.problem))
        try:
            items = await read_uploads(request, limits)
        except Refused as refused:
            return refusal(refused.status, refused.reason)
        except ClientDisconnect:
            return Response(status_code=400)
        started = time.perf_counter()
        try:
            predictions = await scorer.score(items)
        except ScoringFailed as failed:
            return refusal(500, str(failed))
        log.debug("REST: scored %d of %d files in %.0f ms", sum(p.scored for p in predictions), len(predictions),
                  1000 * (time.perf_counter() - started))
        return JSONResponse(answer(predictions, service.predictor.decision), headers=NO_STORE)

    return predict


# OpenAPI: the schema of the answer follows RECORD_FIELDS.
FileResult = create_model("FileResult", name=(str, ...),
                          **{name: (JSON_TYPES[RECORD_TYPES[name]] | None, None) for name in RECORD_FIELDS})


class ModelInfo(BaseModel):
    name: str
    version: str | None
    threshold: float


class PredictAnswer(BaseModel):
    model: ModelInfo
    results: list[FileResult]  # type: ignore[valid-type]


class RefusalBody(BaseModel):
    detail: str


def _openapi_request(limits: Limits) -> dict[str, Any]:
    upload = {"type": "array", "minItems": 1, "maxItems": limits.max_files,
              "items": {"type": "string", "format": "binary"},
              "description": f"1 to {limits.max_files} X-rays (PNG, JPEG or DICOM), at most "
                             f"{wording.megabytes(limits.max_file_bytes)} each"}
    schema = {"type": "object", "required": [FIELD], "properties": {FIELD: upload}}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


def routes(service: Served, max_file_bytes: int, max_files: int) -> list[APIRoute]:
    """The REST route around the app's model service, with the app's limits (`max_file_bytes` per file,
    within `scoring.pixels.MAX_FILE_BYTES`; `max_files` per request)."""
    limits = Limits.of_app(max_files, max_file_bytes)
    refusals = {400: "No files, or not a multipart body", 413: "Too many files, or a file too large",
                503: "No model is loaded"}
    return [APIRoute(
        PATH, predict_endpoint(service, limits), methods=["POST"], response_model=PredictAnswer,
        summary="Screen chest X-rays for pneumonia", tags=["screening"], openapi_extra=_openapi_request(limits),
        description=DESCRIPTION,
        responses={status: {"model": RefusalBody, "description": text} for status, text in refusals.items()},
    )]


def launch_options(options: dict[str, Any], service: Served, max_file_bytes: int, max_files: int) -> dict[str, Any]:
    """`options` for `demo.launch(...)` (e.g. the on-device page's) with the REST route added to its routes."""
    app_kwargs = dict(options.get("app_kwargs", {}))
    app_kwargs["routes"] = [*app_kwargs.get("routes", []), *routes(service, max_file_bytes, max_files)]
    return {**options, "app_kwargs": app_kwargs}
