"""Gradio app: pneumonia screening of paediatric chest X-rays, with Grad-CAM and the model card.

    python app.py [--model-uri URI] [--host 127.0.0.1] [--port 7860] [--share]

`--model-uri` takes `models:/NAME@ALIAS`, `models:/NAME/VERSION` or a folder written by
`python -m pipeline.export` (default: the production alias in the project's MLflow store). Every flag
has an environment fallback (see `parse_args`). The model is loaded once, when the module builds
`demo`; with no model the app still starts and says how to train one.

Research demo: not a medical device, not for diagnosis.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import io
import logging
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr
import numpy as np
import pandas as pd
from gradio.utils import NamedString, get_upload_folder
from PIL import Image

from pipeline.common import setup_logging
from pipeline.export import DATA_SOURCE, NOT_A_DEVICE, card_markdown
from pipeline.imaging import (
    RASTER_FORMATS,
    ImageDecodeError,
    decode_greyscale,
    describe,
    is_dicom,
    read_bytes,
    resize_grey,
)
from pipeline.registry import (
    BUNDLE_FILE,
    ModelUnavailableError,
    TrackingUnavailableError,
    load_serving_model,
    production_uri,
)
from pipeline.serving import Predictor

if TYPE_CHECKING:
    from pipeline.gradcam import GradCam  # imported for real only once a model is loaded (TensorFlow)

log = logging.getLogger("app")

# No usage reports or version checks from Gradio: set before any Blocks reads it.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

APP_DIR = Path(__file__).parent
EXAMPLES_DIR = APP_DIR / "examples"
SHIPPED_MODEL_DIR = "model"

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_MAX_FILE_MB = 20
MAX_FILES = 16
# Two cores, and TensorFlow already spreads one request over both: run one request at a time and
# let a bounded number wait ("Queue is full" beyond that) rather than thrash.
CONCURRENCY = 1
QUEUE_SIZE = 32
# Every minute, delete uploads and rendered heatmaps older than five minutes.
DELETE_CACHE = (60, 300)
UPLOAD_TTL_ENV = "PNEUMONIA_UPLOAD_TTL_S"  # another age in seconds, swept every min(60, age) seconds

# The plausibility checks (see CHECKS_TEXT); they catch obvious mistakes, nothing more.
COLOUR_SPREAD_LIMIT = 32.0  # mean of max-min over R, G, B per pixel, on 0..255
MAX_ASPECT = 3.0
MIN_PIXEL_STD = 4.0
COLOUR_PROBE_SIZE = 128
M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8  # glibc's mallopt parameter numbers (malloc.h)
MALLOC_ARENAS = 2
MMAP_THRESHOLD_BYTES = 128 * 1024

COLUMNS = ["file", "probability of pneumonia", "result", "note"]
UPLOAD_PROMPT = "Upload a chest X-ray (PNG, JPEG or DICOM), or click an example."
LABEL_TITLE = "Result: the model's probability of pneumonia, and its decision at the threshold"

HEADER = f"""
# Pneumonia screening from a paediatric chest X-ray (research demo)

Upload one or more frontal chest X-rays of children (PNG, JPEG or DICOM, up to {{max_mb}} MB each,
{MAX_FILES} files at a time). The model gives its probability of pneumonia and a decision at the
threshold chosen on validation data, with a Grad-CAM map of the image regions that drove the score.

> {NOT_A_DEVICE}
"""

CHECKS_TEXT = f"""
**What is checked before scoring.** The file must decode as PNG, JPEG or DICOM within the size and
pixel limits. An image is then not scored if it is strongly coloured (PNG and JPEG only: mean spread
between colour channels above {COLOUR_SPREAD_LIMIT:.0f} of 255), if one side is over {MAX_ASPECT:.0f}
times the other, or if it is almost uniform. These checks catch obvious mistakes; the app cannot tell
whether an image really is a chest X-ray, nor a child's, nor a frontal view. Images and their metadata
are not logged or kept: uploads are deleted from the server within minutes.
"""

GRADCAM_CAPTION = (
    "**Grad-CAM:** warm colours mark the regions that most raised the model's score for its decision "
    "(shown for the first scored file). It shows where the model looked, **not where a lesion is**."
)

TRAINING_HELP = """
To train and register a model (from the project folder):

```bash
make repro DATA=path/to/ChestXRay2017.zip   # or plain `make repro` with internet access
```

then restart the app. To serve a model copied from elsewhere, export it with
`python -m pipeline.export path/to/folder` and start `python app.py --model-uri path/to/folder`.
"""


@dataclass
class ModelService:
    """What the app serves with, loaded once at start-up; `problem` says why there is no model."""

    uri: str
    predictor: Predictor | None = None
    explainer: GradCam | None = None  # None without a model, or for a model with no convolutional block
    problem: str | None = None

    @property
    def ready(self) -> bool:
        return self.predictor is not None


@dataclass(frozen=True)
class FileResult:
    name: str
    probability: float | None = None
    label: str | None = None
    note: str = ""


@dataclass(frozen=True)
class Outcome:
    """Everything one request shows: a row per file, and the first scored file's label and heatmap."""

    results: list[FileResult] = field(default_factory=list)
    label: dict[str, float] | None = None
    overlay: np.ndarray | None = None
    status: str = ""

    def table(self) -> pd.DataFrame:
        rows = [[r.name, None if r.probability is None else round(r.probability, 4), r.label or "", r.note]
                for r in self.results]
        return pd.DataFrame(rows, columns=COLUMNS)


def load_service(model_uri: str | None) -> ModelService:
    """Load the model, its scorer and Grad-CAM once, and trace both so the first request is not slow.

    Never raises: any failure becomes a service without a model whose `problem` the page shows.
    """
    uri = model_uri or production_uri()
    started = time.perf_counter()
    try:
        serving = load_serving_model(uri)
        predictor = Predictor(serving)
        predictor.scorer.probabilities(np.zeros((1, 64, 64), dtype=np.uint8))
    except (ModelUnavailableError, TrackingUnavailableError) as error:
        log.warning("no model to serve: %s", error)
        return ModelService(uri, problem=str(error))
    except Exception as error:  # a broken model file must not stop the page from explaining itself
        log.exception("model at %s could not be loaded", uri)
        return ModelService(uri, problem=f"the model at {uri} could not be loaded: {describe(error)}")
    explainer = None
    try:
        from pipeline.gradcam import GradCam

        explainer = GradCam(serving.keras_model)
        explainer.heatmap(np.zeros((64, 64), dtype=np.uint8))
    except ValueError as error:
        log.warning("Grad-CAM unavailable for this model: %s", error)
    log.info("serving %s (threshold %.4f), loaded in %.1f s (TensorFlow import included)", uri,
             predictor.threshold, time.perf_counter() - started)
    return ModelService(uri, predictor, explainer)


def plausibility_problem(data: bytes, grey: np.ndarray) -> str | None:
    """Why a decoded image is implausible as a chest X-ray, or None. Cheap, and deliberately modest."""
    height, width = grey.shape
    if max(height, width) > MAX_ASPECT * min(height, width):
        return f"not scored: {width} x {height} pixels is too elongated for a chest X-ray"
    if float(grey.std()) < MIN_PIXEL_STD:
        return "not scored: the image is almost uniform"
    spread = colour_spread(data)
    if spread is not None and spread > COLOUR_SPREAD_LIMIT:
        return (f"not scored: strongly coloured (channel spread {spread:.0f} of 255); "
                "X-rays are greyscale")
    return None


def colour_spread(data: bytes) -> float | None:
    """Mean over pixels of (max - min) of R, G, B, from a small thumbnail; 0 for greyscale modes.

    Called only on bytes `decode_greyscale` has accepted (so size and format are already checked).
    None for DICOM and for anything PIL cannot reopen: no claim is made then.
    """
    if is_dicom(data):
        return None
    try:
        with Image.open(io.BytesIO(data), formats=RASTER_FORMATS) as image:
            if image.mode in ("1", "L", "LA", "I", "F") or image.mode.startswith("I;16"):
                return 0.0
            image.draft("RGB", (COLOUR_PROBE_SIZE, COLOUR_PROBE_SIZE))  # JPEG: decode at reduced scale
            image.thumbnail((COLOUR_PROBE_SIZE, COLOUR_PROBE_SIZE))
            rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
    except Exception:  # noqa: BLE001 (the real decode already succeeded; this check is best effort)
        return None
    return float((rgb.max(axis=-1) - rgb.min(axis=-1)).mean())


def label_value(probability: float, label: str, threshold: float) -> dict[str, float]:
    """gr.Label heads its display with the highest-confidence key, which would ignore the threshold:
    one key that states the decision, with the probability of pneumonia as its bar."""
    return {f"{label}: probability of pneumonia {probability:.1%}, threshold {threshold:.1%}": probability}


def predict_files(paths: list[str] | None, service: ModelService,
                  max_file_bytes: int = DEFAULT_MAX_FILE_MB * 1_000_000) -> Outcome:
    """The app's prediction logic: uploaded file paths in, a result per file out; never raises for bad
    input. The label and Grad-CAM describe the first file that was scored."""
    paths = list(paths or [])
    if not paths:
        return Outcome(status=UPLOAD_PROMPT)
    if not service.ready:
        raise ModelUnavailableError(service.problem or "no model is loaded")
    results: list[FileResult | None] = [None] * len(paths)
    accepted: list[tuple[int, np.ndarray]] = []
    for position, path in enumerate(paths):
        name = Path(path).name
        if position >= MAX_FILES:
            results[position] = FileResult(name, note=f"not scored: at most {MAX_FILES} files per request")
            continue
        try:
            data = read_bytes(Path(path), max_bytes=max_file_bytes)
            grey = decode_greyscale(data, max_bytes=max_file_bytes)
        except ImageDecodeError as error:
            results[position] = FileResult(name, note=str(error))
            continue
        problem = plausibility_problem(data, grey)
        if problem:
            results[position] = FileResult(name, note=problem)
        else:
            accepted.append((position, grey))

    predictor = service.predictor
    size = predictor.scorer.input_size
    batch = np.stack([resize_grey(grey, size) for _, grey in accepted]) if accepted else np.zeros((0, size, size))
    for (position, _), probability in zip(accepted, predictor.scorer.probabilities(batch)):
        probability = float(probability)
        results[position] = FileResult(Path(paths[position]).name, probability, predictor.label(probability))

    done = [r for r in results if r is not None]
    if not accepted:
        return Outcome(done, status=_status(done, None))
    first_position, first_grey = accepted[0]
    first = done[first_position]
    overlay = _overlay(service, first_grey, first.label == "PNEUMONIA")
    return Outcome(done, label_value(first.probability, first.label, predictor.threshold), overlay,
                   _status(done, first.name))


def score_and_render(paths: list[str] | None, service: ModelService,
                     max_file_bytes: int) -> tuple[Outcome, str | None]:
    """`predict_files`, then the Grad-CAM overlay written as a PNG: everything that allocates per image."""
    outcome = predict_files(paths, service, max_file_bytes)
    return outcome, None if outcome.overlay is None else heatmap_file(outcome.overlay)


def _overlay(service: ModelService, grey: np.ndarray, towards_pneumonia: bool) -> np.ndarray | None:
    if service.explainer is None:
        return None
    from pipeline.gradcam import overlay

    return overlay(grey, service.explainer.heatmap(grey, towards_pneumonia))


def _status(results: list[FileResult], shown: str | None) -> str:
    scored = sum(r.probability is not None for r in results)
    lines = [f"Scored {scored} of {len(results)} file{'s' if len(results) != 1 else ''}."]
    if shown is not None and len(results) > 1:
        lines.append(f"The result and Grad-CAM above are for `{_md_safe(shown)}`; the table lists every file.")
    for result in results:
        if result.probability is None:
            lines.append(f"- `{_md_safe(result.name)}`: {result.note}")
    return "\n".join(lines)


def _md_safe(text: str) -> str:
    return text.replace("`", "'")


def no_model_message(service: ModelService) -> str:
    """One line for an error toast or an API client: why nothing can be scored, and the remedy."""
    remedy = "" if "make repro" in (service.problem or "") else (
        " Train and register one with `make repro`, then restart the app.")
    return f"No model is loaded, so nothing can be scored: {service.problem}.{remedy}"


def no_model_markdown(service: ModelService) -> str:
    return f"## No model is loaded\n\n{service.problem}\n{TRAINING_HELP}"


def model_panel(service: ModelService) -> str:
    if not service.ready:
        return f"{no_model_markdown(service)}\n**Training data:** {DATA_SOURCE}\n\n{NOT_A_DEVICE}"
    serving = service.predictor.serving_model
    # A registry URI, or only the name of an exported folder: the page need not show server paths.
    source = service.uri if service.uri.startswith("models:/") else f"exported folder {Path(service.uri).name}"
    return f"{card_markdown(serving.card, serving.threshold)}\n\n*Served from `{source}`.*"


class UploadBox(gr.File):
    """`gr.File`, less a Gradio 6.31 leak: with type="filepath" its preprocessing opens an empty
    `NamedTemporaryFile(delete=False)` in the upload cache for every file of every request, and nothing
    ever deletes it (`delete_cache` tracks only the files Gradio hands out). The path passed on is the
    upload's own cached copy, exactly as before."""

    is_template = True  # drawn by the frontend's File component, as a gr.File

    def _process_single_file(self, f: Any) -> Any:
        if self.type == "filepath" and not self.file_types:
            return NamedString(f.path)
        return super()._process_single_file(f)


def upload_cache_policy() -> tuple[int, int]:
    """Gradio's `delete_cache` (every `frequency` seconds, delete files older than `age` seconds):
    DELETE_CACHE, or the age set by env PNEUMONIA_UPLOAD_TTL_S (whole seconds, >= 1), swept every
    min(60, age) seconds, so nothing uploaded outlives about twice that age."""
    value = os.environ.get(UPLOAD_TTL_ENV, "").strip()
    if not value:
        return DELETE_CACHE
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{UPLOAD_TTL_ENV} must be a whole number of seconds, at least 1; got {value!r}")
    age = int(value)
    return min(DELETE_CACHE[0], age), age


def create_demo(model_uri: str | None = None, *, service: ModelService | None = None,
                max_file_bytes: int = DEFAULT_MAX_FILE_MB * 1_000_000) -> gr.Blocks:
    """Build the app around one loaded model (`service`, or loaded here from `model_uri`).

    Uploads and rendered heatmaps are deleted from Gradio's cache (`GRADIO_TEMP_DIR`) once older than
    five minutes, checked every minute; env PNEUMONIA_UPLOAD_TTL_S sets another age (see
    `upload_cache_policy`).
    """
    delete_cache = upload_cache_policy()  # a bad setting fails before the (slow) model load
    service = service or load_service(model_uri)
    # All model work on one thread: Gradio runs each event on any of its ~40 worker threads, and every
    # new thread that touches TensorFlow and ONNX Runtime gets its own allocator arena and thread-local
    # state, so resident memory crept up with concurrency. The queue runs one event at a time anyway.
    model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    def on_predict(paths: str | list[str] | None) -> tuple[Any, Any, pd.DataFrame, str]:
        if isinstance(paths, str):
            paths = [paths]  # the single-file /predict endpoint
        if paths and not service.ready:  # clearing the upload box (no paths) just blanks the results
            raise gr.Error(no_model_message(service), print_exception=False)
        started = time.perf_counter()
        try:
            outcome, overlay = model_thread.submit(score_and_render, paths, service, max_file_bytes).result()
        except Exception as error:
            # Never the image or its metadata in the log: only what went wrong in our code.
            log.exception("prediction failed")
            raise gr.Error("Scoring failed unexpectedly; the error was logged on the server.",
                           print_exception=False) from error
        failed = sum(r.probability is None for r in outcome.results)
        log.info("scored %d of %d files in %.0f ms", len(outcome.results) - failed, len(outcome.results),
                 1000 * (time.perf_counter() - started))
        if failed:
            gr.Warning(f"{failed} of {len(outcome.results)} file(s) could not be scored: see the table.")
        return outcome.label, overlay, outcome.table(), outcome.status

    with gr.Blocks(title="Pneumonia screening (research demo)", analytics_enabled=False,
                   delete_cache=delete_cache) as demo:
        gr.Markdown(HEADER.format(max_mb=f"{max_file_bytes / 1e6:.0f}"))
        if not service.ready:
            gr.Markdown(no_model_markdown(service), elem_id="no-model")
        with gr.Row():
            with gr.Column():
                # Not gr.Image, and no file_types filter: every upload reaches our own checks, so a
                # wrong file gets a specific message (and extension-less DICOM files still work).
                files = UploadBox(label="Chest X-rays (PNG, JPEG or DICOM)", file_count="multiple",
                                  type="filepath", elem_id="upload")
                run = gr.Button("Screen", variant="primary", interactive=service.ready)
                gr.Markdown(CHECKS_TEXT)
            with gr.Column():
                label = gr.Label(label=LABEL_TITLE, elem_id="result-label")
                heatmap = gr.Image(label="Grad-CAM: where the model looked (not where a lesion is)",
                                   type="numpy", format="png", interactive=False, elem_id="gradcam")
                gr.Markdown(GRADCAM_CAPTION)
        status = gr.Markdown(elem_id="status")
        table = gr.Dataframe(headers=COLUMNS, interactive=False, label="All files", elem_id="results")
        outputs = [label, heatmap, table, status]
        examples = sorted(EXAMPLES_DIR.glob("*.png"))
        if examples:
            # Clicking one fills the upload box, whose change event scores it: one click in all.
            gr.Examples([[[str(path)]] for path in examples], inputs=[files], cache_examples=False,
                        example_labels=[_example_label(path) for path in examples],
                        label="Examples (from the training data: one click scores them)")
        with gr.Accordion("About the model", open=True):
            gr.Markdown(model_panel(service), elem_id="model-card")
        # Two API endpoints: /predict takes one file (`client.predict(handle_file(path), api_name="/predict")`),
        # /predict_files a list. The one-file input is never shown; it only gives /predict its type.
        # All share one concurrency group, so the queue's limit bounds the model's work, not each event's.
        single = UploadBox(file_count="single", type="filepath", visible=False)
        single.upload(on_predict, inputs=[single], outputs=outputs, api_name="predict", concurrency_id="model")
        run.click(on_predict, inputs=[files], outputs=outputs, api_name="predict_files", concurrency_id="model")
        files.change(on_predict, inputs=[files], outputs=outputs, api_visibility="private",
                     concurrency_id="model")
    demo.queue(default_concurrency_limit=CONCURRENCY, max_size=QUEUE_SIZE)
    return demo


def heatmap_file(overlay: np.ndarray) -> str:
    """The overlay as a PNG in Gradio's cache, written once and atomically.

    Returning the array would let Gradio 6.31 save it under a content-hash name by rewriting the file in
    place, so a second request for the same image truncates the PNG while a first client downloads it
    (29 of 1,600 requests under load). A file already in the cache is served as it is, and swept by
    `delete_cache` like every upload.
    """
    buffer = io.BytesIO()
    Image.fromarray(overlay).save(buffer, format="PNG")
    data = buffer.getvalue()
    folder = Path(get_upload_folder()) / hashlib.sha256(data).hexdigest()
    target = folder / "gradcam.png"
    if target.exists():
        os.utime(target)  # the sweep ages files by their times: this one was just served again
        return str(target)
    folder.mkdir(parents=True, exist_ok=True)
    descriptor, staging = tempfile.mkstemp(dir=folder, suffix=".partial")
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    os.replace(staging, target)
    return str(target)


def _example_label(path: Path) -> str:
    """`pneumonia-viral_person1007_virus_1690.png` -> `Pneumonia (viral)`."""
    kind, _, detail = path.stem.split("_", 1)[0].partition("-")
    return kind.capitalize() + (f" ({detail})" if detail else "")


def default_model_uri() -> str | None:
    """An exported model shipped beside the app (a Hugging Face Space has no MLflow store), else None:
    the registry's production alias."""
    bundled = APP_DIR / SHIPPED_MODEL_DIR
    return str(bundled) if (bundled / BUNDLE_FILE).is_file() else None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python app.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", DEFAULT_HOST),
                        help="interface to listen on (env GRADIO_SERVER_NAME; default %(default)s)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", DEFAULT_PORT)),
                        help="port (env GRADIO_SERVER_PORT; default %(default)s)")
    parser.add_argument("--share", action="store_true", default=_env_flag("GRADIO_SHARE"),
                        help="also ask for a public gradio.live link (env GRADIO_SHARE)")
    parser.add_argument("--model-uri", default=os.environ.get("PNEUMONIA_MODEL_URI") or default_model_uri(),
                        help="models:/NAME@ALIAS, models:/NAME/VERSION or an exported model folder "
                             "(env PNEUMONIA_MODEL_URI; default: a `model/` export beside app.py, as on a "
                             "Space, else the production alias)")
    parser.add_argument("--max-file-mb", type=float,
                        default=float(os.environ.get("PNEUMONIA_MAX_FILE_MB", DEFAULT_MAX_FILE_MB)),
                        help="largest upload accepted, in MB (env PNEUMONIA_MAX_FILE_MB; default %(default)s)")
    return parser.parse_args(argv)


def launch(app: gr.Blocks, settings: argparse.Namespace) -> None:
    app.launch(server_name=settings.host, server_port=settings.port, share=settings.share,
               max_file_size=int(settings.max_file_mb * 1_000_000), show_error=False,
               prevent_thread_lock=True, quiet=True)
    log.info("serving on %s", app.local_url)
    if settings.share and not app.share_url:
        log.warning("the public share link could not be created (no internet access?): "
                    "still serving locally at %s", app.local_url)
    app.block_thread()


def tune_malloc() -> bool:
    """Keep resident memory flat under load (glibc only; explicit MALLOC_* settings in the environment win).

    - Arenas: glibc gives threads their own (up to 8 per core) and memory freed in one is not reused by
      another; Gradio serves from ~40 threads. Two is the usual server setting.
    - mmap threshold: glibc raises it after the first large free, after which every upload, image array
      and PNG buffer (100 KB-1 MB) is carved from the heap and fragments it. Fixed, they are mapped and
      returned to the system when freed.
    """
    if not sys.platform.startswith("linux") or any(name.startswith("MALLOC_") for name in os.environ):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # another C library (musl): nothing to tune
        return False
    return bool(libc.mallopt(M_ARENA_MAX, MALLOC_ARENAS)) and bool(
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


# Read the command line only when run as a script; imported (tests, `gradio app.py`), the environment
# fallbacks apply. Either way the model loads here, once per process.
SETTINGS = parse_args(sys.argv[1:] if __name__ == "__main__" else [])
if __name__ == "__main__":
    setup_logging()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own start-up probes
tune_malloc()  # before Gradio starts its worker threads
SERVICE = load_service(SETTINGS.model_uri)
demo = create_demo(service=SERVICE, max_file_bytes=int(SETTINGS.max_file_mb * 1_000_000))

if __name__ == "__main__":
    launch(demo, SETTINGS)
