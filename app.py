"""Gradio app: pneumonia screening of paediatric chest X-rays, with a class-activation map and the model card.

    python app.py [--model-uri URI] [--host 127.0.0.1] [--port 7860] [--share]

It serves the registered model's ONNX serving artefact (`serving.runtime`): no TensorFlow, and MLflow
only to resolve a `models:/` URI. Importing this module builds `demo` and nothing else; the model loads
on first use, or before launch when run as a script. Research demo: not a medical device.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from serving import gradio_workarounds as workarounds
from serving import ondevice
from serving.card import DATA_SOURCE, NOT_A_DEVICE, card_markdown
from serving.checks import CHECKS_TEXT
from serving.overlay import heatmap, overlay
from serving.runtime import Prediction, Predictor
from serving.store import ARTEFACT_FILE, ModelUnavailableError, TrackingUnavailableError, load_artefact

log = logging.getLogger("app")

APP_DIR = Path(__file__).parent
EXAMPLES_DIR = APP_DIR / "examples"
SHIPPED_MODEL_DIR = APP_DIR / "model"

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_MAX_FILE_MB = 20
MAX_FILES = 16
# Two cores: one request at a time, and a bounded number waiting ("Queue is full" beyond that).
CONCURRENCY = 1
QUEUE_SIZE = 32
# Every minute, delete uploads and rendered heatmaps older than five minutes.
DELETE_CACHE = (60, 300)
UPLOAD_TTL_ENV = "PNEUMONIA_UPLOAD_TTL_S"  # another age in seconds, swept every min(60, age) seconds
# The heatmap is drawn at most this many pixels a side: enough to see, cheap to send.
OVERLAY_MAX_SIDE = 512
M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8  # glibc's mallopt parameter numbers (malloc.h)
MALLOC_ARENAS = 2
MMAP_THRESHOLD_BYTES = 128 * 1024

COLUMNS = ["file", "probability of pneumonia", "result", "note"]
UPLOAD_PROMPT = "Upload a chest X-ray (PNG, JPEG or DICOM), or click an example."
LABEL_TITLE = "Result: the model's probability of pneumonia, and its decision at the threshold"

HEADER = f"""
# Pneumonia screening from a paediatric chest X-ray (research demo)

Upload one or more frontal chest X-rays of children (PNG, JPEG or DICOM, up to {{max_mb}} MB each,
{MAX_FILES} files at a time). The model gives its probability of pneumonia and a decision at its
registered threshold, with a map of the image regions that drove the score.

> {NOT_A_DEVICE}
"""

CHECKS_MARKDOWN = f"""
**What is checked before scoring.** The file must decode as PNG, JPEG or DICOM within the size and
pixel limits. {CHECKS_TEXT} These checks catch obvious mistakes; the app cannot be sure that an image
really is a chest X-ray, nor a child's, nor a frontal view. Images and their metadata are not logged or
kept: uploads are deleted within minutes, and all of them when the app stops.
"""

CAM_CAPTION = (
    "**Class-activation map:** warm colours mark the regions that most raised the model's score for its "
    "decision (shown for the first scored file). It shows where the model looked, **not where a lesion is**."
)

TRAINING_HELP = """
To train and register a model (from the project folder):

```bash
make repro          # or: make repro DATA=path/to/ChestXRay2017.zip
```

then restart the app. To serve a model copied from elsewhere, export it with
`python -m pipeline.export path/to/folder` and start `python app.py --model-uri path/to/folder`.
"""


class ModelService:
    """The model the app serves, loaded once (on first use, or by `load()` before launch).

    Never raises: a failure to load leaves `problem` saying why, which the page shows.
    """

    def __init__(self, uri: str | None) -> None:
        self.uri = uri
        self.predictor: Predictor | None = None
        self.problem: str | None = None
        self._loaded = False
        self._lock = threading.Lock()

    def load(self) -> ModelService:
        with self._lock:
            if not self._loaded:
                self._load()
                self._loaded = True
        return self

    @property
    def ready(self) -> bool:
        return self.load().predictor is not None

    def _load(self) -> None:
        started = time.perf_counter()
        try:
            self.predictor = Predictor(load_artefact(self.uri))
        except (ModelUnavailableError, TrackingUnavailableError) as error:
            log.warning("no model to serve: %s", error)
            self.problem = str(error)
            return
        except Exception as error:  # a broken store or model must not stop the page from explaining itself
            log.exception("the model at %s could not be loaded", self.uri)
            self.problem = f"the model at {self.uri or 'the production alias'} could not be loaded: {error}"
            return
        log.info("serving %s version %s (threshold %.4f), loaded in %.2f s", self.predictor.decision.model_name,
                 self.predictor.decision.model_version, self.predictor.threshold, time.perf_counter() - started)


@dataclass(frozen=True)
class Outcome:
    """Everything one request shows: a row per file, and the first scored file's label and heatmap."""

    results: list[Prediction] = field(default_factory=list)
    label: dict[str, float] | None = None
    overlay: Any = None
    status: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def table(self) -> pd.DataFrame:
        rows = [[Path(r.name).name, None if r.probability is None else round(r.probability, 4), r.label or "",
                 r.error or ""] for r in self.results]
        return pd.DataFrame(rows, columns=COLUMNS)


def predict_files(paths: list[str] | None, service: ModelService,
                  max_file_bytes: int = DEFAULT_MAX_FILE_MB * 1_000_000) -> Outcome:
    """The app's prediction logic: uploaded file paths in, a result per file out; never raises for bad
    input. The label and heatmap describe the first file that was scored."""
    paths = list(paths or [])
    if not paths:
        return Outcome(status=UPLOAD_PROMPT)
    if not service.ready:
        raise ModelUnavailableError(service.problem or "no model is loaded")
    predictor = service.predictor
    results = predictor.predict_paths([Path(p) for p in paths[:MAX_FILES]], max_bytes=max_file_bytes,
                                      with_cam=True)
    results += [Prediction(p, None, None, predictor.threshold, f"not scored: at most {MAX_FILES} files per request")
                for p in paths[MAX_FILES:]]
    details = api_result(results, predictor)
    first = next((r for r in results if r.scored), None)
    if first is None:
        return Outcome(results, status=status_text(results, None), details=details)
    return Outcome(results, label_value(first, predictor.threshold), render_overlay(first, predictor),
                   status_text(results, Path(first.name).name), details)


def score_and_render(paths: list[str] | None, service: ModelService, max_file_bytes: int) -> tuple[Outcome, str | None]:
    """`predict_files`, then the heatmap written as a PNG: everything that allocates per image."""
    outcome = predict_files(paths, service, max_file_bytes)
    return outcome, None if outcome.overlay is None else workarounds.write_heatmap(outcome.overlay)


def render_overlay(prediction: Prediction, predictor: Predictor) -> Any:
    grey = prediction.grey
    scale = OVERLAY_MAX_SIDE / max(grey.shape)
    if scale < 1:
        from serving.imaging import resize_to

        grey = resize_to(grey, (round(grey.shape[0] * scale), round(grey.shape[1] * scale)))
    heat = heatmap(prediction.cam, grey.shape, prediction.label == predictor.decision.class_names[1],
                   predictor.decision.crop)
    return overlay(grey, heat)


def api_result(results: list[Prediction], predictor: Predictor) -> dict[str, Any]:
    """The structured result the API returns beside the display: what a program needs, nothing more."""
    decision = predictor.decision
    return {
        "model_name": decision.model_name, "model_version": decision.model_version,
        "threshold": decision.threshold,
        "results": [{"file": Path(r.name).name, "probability": r.probability, "label": r.label, "error": r.error}
                    for r in results],
    }


def label_value(prediction: Prediction, threshold: float) -> dict[str, float]:
    """gr.Label heads its display with the highest-confidence key, which would ignore the threshold:
    one key that states the decision, with the probability of pneumonia as its bar."""
    probability = prediction.probability
    return {f"{prediction.label}: probability of pneumonia {probability:.1%}, threshold {threshold:.1%}":
            probability}


def status_text(results: list[Prediction], shown: str | None) -> str:
    scored = sum(r.scored for r in results)
    lines = [f"Scored {scored} of {len(results)} file{'s' if len(results) != 1 else ''}."]
    if shown is not None and len(results) > 1:
        lines.append(f"The result and map above are for `{_md_safe(shown)}`; the table lists every file.")
    for result in results:
        if not result.scored:
            lines.append(f"- `{_md_safe(Path(result.name).name)}`: {result.error}")
    return "\n".join(lines)


def _md_safe(text: str) -> str:
    return text.replace("`", "'")


def no_model_message(service: ModelService) -> str:
    """One line for an error toast or an API client: why nothing can be scored, and the remedy."""
    remedy = "" if "make repro" in (service.problem or "") else (
        " Train and register one with `make repro`, then restart the app.")
    return f"No model is loaded, so nothing can be scored: {service.problem}.{remedy}"


def model_panel(service: ModelService) -> str:
    if not service.ready:
        return f"## No model is loaded\n\n{service.problem}\n{TRAINING_HELP}\n**Training data:** {DATA_SOURCE}\n\n{NOT_A_DEVICE}"
    decision = service.predictor.decision
    uri = service.uri or ""
    # A registry URI, or only the name of an exported folder: the page need not show server paths.
    source = uri if uri.startswith("models:/") else f"exported folder {Path(uri).name or uri}"
    return f"{card_markdown(decision)}\n\n*Served from `{source}`.*"


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


def create_demo(service: ModelService, max_file_bytes: int = DEFAULT_MAX_FILE_MB * 1_000_000) -> gr.Blocks:
    """The app around one model service (loaded on first use)."""
    delete_cache = upload_cache_policy()
    # All model work on one thread: Gradio runs events on any of its ~40 worker threads, and every thread
    # that touches ONNX Runtime and PIL grows its own allocator arena. The queue runs one event at a time.
    model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    def on_predict(paths: str | list[str] | None) -> tuple[Any, ...]:
        if isinstance(paths, str):
            paths = [paths]  # the single-file /predict endpoint
        if paths and not service.ready:  # clearing the upload box (no paths) just blanks the results
            raise gr.Error(no_model_message(service), print_exception=False)
        started = time.perf_counter()
        try:
            outcome, heatmap_path = model_thread.submit(score_and_render, paths, service, max_file_bytes).result()
        except Exception as error:
            # Never the image or its metadata in the log: only what went wrong in our code.
            log.exception("prediction failed")
            raise gr.Error("Scoring failed unexpectedly; the error was logged on the server.",
                           print_exception=False) from error
        failed = sum(not r.scored for r in outcome.results)
        log.info("scored %d of %d files in %.0f ms", len(outcome.results) - failed, len(outcome.results),
                 1000 * (time.perf_counter() - started))
        if failed:
            gr.Warning(f"{failed} of {len(outcome.results)} file(s) could not be scored: see the table.")
        return outcome.label, heatmap_path, outcome.table(), outcome.status, outcome.details

    def on_page_load() -> tuple[Any, Any, Any]:
        ready = service.ready
        return (gr.update(value=model_panel(service)), gr.update(interactive=ready),
                gr.update(value="" if ready else f"## No model is loaded\n\n{service.problem}", visible=not ready))

    with gr.Blocks(title="Pneumonia screening (research demo)", analytics_enabled=False,
                   delete_cache=delete_cache) as demo:
        gr.Markdown(HEADER.format(max_mb=f"{max_file_bytes / 1e6:.0f}"))
        no_model = gr.Markdown(visible=False, elem_id="no-model")
        with gr.Row():
            with gr.Column():
                # No file_types filter: every upload reaches our own checks, so a wrong file gets a
                # specific message (and extension-less DICOM files still work).
                files = workarounds.UploadBox(label="Chest X-rays (PNG, JPEG or DICOM)", file_count="multiple",
                                              type="filepath", elem_id="upload")
                run = gr.Button("Screen", variant="primary")
                gr.Markdown(CHECKS_MARKDOWN)
            with gr.Column():
                label = gr.Label(label=LABEL_TITLE, elem_id="result-label")
                heat = gr.Image(label="Where the model looked (not where a lesion is)", type="filepath",
                                format="png", interactive=False, elem_id="heatmap")
                gr.Markdown(CAM_CAPTION)
        status = gr.Markdown(elem_id="status")
        table = gr.Dataframe(headers=COLUMNS, interactive=False, label="All files", elem_id="results")
        with gr.Accordion("Result as JSON (what the API returns)", open=False):
            details = gr.JSON(elem_id="details")
        outputs = [label, heat, table, status, details]
        examples = sorted(EXAMPLES_DIR.glob("*.png"))
        if examples:
            # Clicking one fills the upload box, whose change event scores it: one click in all.
            gr.Examples([[[str(path)]] for path in examples], inputs=[files], cache_examples=False,
                        example_labels=[_example_label(path) for path in examples],
                        label="Examples (from the training data: one click scores them)")
        with gr.Accordion("About the model", open=True):
            panel = gr.Markdown("Loading the model...", elem_id="model-card")
        # /predict takes one file (`client.predict(handle_file(path), api_name="/predict")`), /predict_files
        # a list. The one-file input is never shown; it only gives /predict its type. All share one
        # concurrency group, so the queue's limit bounds the model's work, not each event's.
        single = workarounds.UploadBox(file_count="single", type="filepath", visible=False)
        single.upload(on_predict, inputs=[single], outputs=outputs, api_name="predict", concurrency_id="model")
        run.click(on_predict, inputs=[files], outputs=outputs, api_name="predict_files", concurrency_id="model")
        files.change(on_predict, inputs=[files], outputs=outputs, api_visibility="private", concurrency_id="model")
        demo.load(on_page_load, outputs=[panel, run, no_model], api_visibility="private")
    # The "On this device" page: the same model in the visitor's browser (serving/ondevice.py).
    ondevice.add_page(demo, service, max_file_bytes, max_files=MAX_FILES, overlay_max_side=OVERLAY_MAX_SIDE)
    demo.queue(default_concurrency_limit=CONCURRENCY, max_size=QUEUE_SIZE)
    return demo


def _example_label(path: Path) -> str:
    """`pneumonia-viral_person1007_virus_1690.png` -> `Pneumonia (viral)`."""
    kind, _, detail = path.stem.split("_", 1)[0].partition("-")
    return kind.capitalize() + (f" ({detail})" if detail else "")


def default_model_uri() -> str | None:
    """An exported model shipped beside the app (a Hugging Face Space has no MLflow store), else None:
    the registry's production alias."""
    return str(SHIPPED_MODEL_DIR) if (SHIPPED_MODEL_DIR / ARTEFACT_FILE).is_file() else None


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
               prevent_thread_lock=True, quiet=True, **ondevice.launch_options(app))
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


if __name__ == "__main__":
    # Before any component exists: components keep the cache folder they were built with.
    SETTINGS = parse_args(sys.argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own start-up probes
    CACHE = workarounds.private_cache()
    workarounds.purge_on_exit(CACHE)
    tune_malloc()  # before Gradio starts its worker threads
else:
    SETTINGS = parse_args([])  # imported (tests, `gradio app.py`): the environment fallbacks apply
SERVICE = ModelService(SETTINGS.model_uri)
demo = create_demo(SERVICE, max_file_bytes=int(SETTINGS.max_file_mb * 1_000_000))

if __name__ == "__main__":
    SERVICE.load()
    try:
        launch(demo, SETTINGS)
    finally:
        workarounds.purge_cache(CACHE)
