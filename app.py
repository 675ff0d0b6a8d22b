"""Gradio app: pneumonia screening of paediatric chest X-rays, with a class-activation map and the model card.

    python app.py [--model-uri URI] [--host 127.0.0.1] [--port 7860] [--share]

It serves the registered model's ONNX serving artefact (`scoring.runtime`): no TensorFlow, and MLflow
only to resolve a `models:/` URI (run as a script: in a helper process, while Gradio is imported).
Importing this module builds `demo` and nothing else; the model loads on first use, or before launch when
run as a script. Research demo: not a medical device.
"""

from __future__ import annotations

import sys
from pathlib import Path

from scoring.store import PendingArtefact
from serving import settings as command_line

APP_DIR = Path(__file__).parent
SHIPPED_MODEL_DIR = APP_DIR / "model"
if __name__ == "__main__":
    # Before Gradio's import (~2 s): a registry model is resolved meanwhile by a helper process on the other
    # core, and MLflow (~1.3 s, ~100 MB to import) never enters this one.
    SETTINGS = command_line.parse_args(sys.argv[1:], SHIPPED_MODEL_DIR, __doc__.split("\n\n")[0])
    PREFETCH = PendingArtefact.start(SETTINGS.model_uri)

import argparse
import ctypes
import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import gradio as gr
import numpy as np

from scoring.checks import CHECKS_TEXT
from scoring.decision import REVIEW
from scoring.pixels import MAX_FILE_BYTES, megabytes
from scoring.runtime import Prediction, Predictor
from scoring.store import (
    ModelUnavailableError,
    TrackingUnavailableError,
    load_artefact,
    production_uri,
)
from serving import gradio_workarounds as workarounds
from serving import ondevice, rest
from serving.card import DATA_SOURCE, NOT_A_DEVICE, card_markdown, percent
from serving.overlay import heatmap, overlay

log = logging.getLogger("app")

EXAMPLES_DIR = APP_DIR / "examples"

MAX_FILES = 16
# Gradio refuses a whole upload when one file is over its limit: it gets this multiple of the per-file
# limit, so a file over the per-file limit still arrives and gets its own row (and the others are scored).
UPLOAD_CEILING_FACTOR = 5
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

COLUMNS = ["file", "result", "probability of pneumonia", "note"]
UPLOAD_PROMPT = "Upload a chest X-ray (PNG, JPEG or DICOM), or click an example."
RESULT_TITLE = "Result of the selected file"
TRIAGE_WORDS = {"NORMAL": "Normal", "PNEUMONIA": "Pneumonia", REVIEW: "Needs review by a reader"}
TOO_MANY = f"not scored: at most {MAX_FILES} files per request. Send the rest in another upload"
# What to do about a refusal from the decoder or the plausibility checks (fragment of the message -> advice).
NEXT_STEPS = {
    "not a recognised image": "Send the X-ray as a PNG, JPEG or DICOM file",
    "corrupt": "Export or download the file again",
    "empty file": "Export or download the file again",
    "too small": "Send the X-ray at its original resolution",
    "megapixel": "Export the X-ray at a smaller resolution",
    "over the size limit": "Export the X-ray at a smaller resolution",
    "strongly coloured": "Send the greyscale X-ray itself, not a photograph or a screenshot of it",
    "elongated": "Send the whole X-ray, not a crop or a strip",
    "uniform": "Check that the file holds the X-ray image",
    "cannot be read": "Upload the file again",
}
DEFAULT_NEXT_STEP = "Check the file, and send a frontal chest X-ray as PNG, JPEG or DICOM"
# Phone width: the table's cells wrap (decision visible without scrolling sideways); focus is always visible.
PAGE_CSS = """
button:focus-visible, input:focus-visible, select:focus-visible, textarea:focus-visible, a:focus-visible,
[role=button]:focus-visible, [role=tab]:focus-visible, [tabindex]:focus-visible, summary:focus-visible {
  outline: 3px solid #1d4ed8 !important; outline-offset: 2px !important; box-shadow: 0 0 0 5px #ffffff !important;
}
#results table { table-layout: fixed; width: 100% !important; min-width: 0 !important; }
#results th, #results td { white-space: normal !important; overflow-wrap: anywhere; }
#results .cell-wrap, #results span { white-space: normal !important; overflow-wrap: anywhere; }
"""
# After scoring, bring the result into view when it is off screen (on a phone it sits below the upload).
SHOW_RESULT_JS = """() => {
  const result = document.getElementById("result-label");
  const top = result ? result.getBoundingClientRect().top : 0;
  if (result && (top < 0 || top > window.innerHeight - 120)) result.scrollIntoView({block: "start"});
}"""
# Gradio 6.31 names some icon buttons by an untranslated key ("common.upload"): give them words.
PAGE_HEAD = """<script>
(() => {
  const words = {"common.upload": "Upload more files", "common.clear": "Remove all files",
                 "common.download": "Download", "common.share": "Share", "common.fullscreen": "Full screen"};
  const name = (key) => words[key] || key.slice(key.indexOf(".") + 1).replace(/_/g, " ");
  const fix = () => document.querySelectorAll("[aria-label^='common.'], [title^='common.']").forEach((el) => {
    for (const attr of ["aria-label", "title"]) {
      const value = el.getAttribute(attr);
      if (value && value.startsWith("common.")) el.setAttribute(attr, name(value));
    }
  });
  new MutationObserver(fix).observe(document.documentElement,
    {subtree: true, childList: true, attributes: true, attributeFilter: ["aria-label", "title"]});
})();
</script>"""

HEADER = f"""
# Pneumonia screening from a paediatric chest X-ray (research demo)

Upload one or more frontal chest X-rays of children (PNG, JPEG or DICOM, up to {{max_mb}} each,
{MAX_FILES} files at a time). For each file the model gives its probability of pneumonia (in percent), its
decision at the registered threshold, a triage (normal, pneumonia, or needs review by a reader), for a
pneumonia whether it is likely bacterial or viral, and a map of the image regions that drove the score.

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
    "decision (for the file selected in the table). It shows where the model looked, **not where a lesion is**."
)
API_DESCRIPTION = (
    "Scores {what}. Returns, in order: the selected file's result (Markdown), its class-activation map (PNG), "
    "the table of all files (probabilities in percent), a summary (Markdown), and the structured result (JSON): "
    "model_name, model_version, model_source, threshold, and per file `file` plus the prediction record "
    "(probability_pneumonia, label, error, triage, subtype, probability_viral, note) and ood_score; "
    "probabilities are fractions from 0 to 1. Not a medical device."
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

    def __init__(self, uri: str | None, prefetch: PendingArtefact | None = None) -> None:
        self.uri = uri
        self.prefetch = prefetch  # the same URI, already being resolved by a helper process
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
            self.predictor = Predictor(self.prefetch.load() if self.prefetch else load_artefact(self.uri))
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
    """Everything one request shows: a row per file, and each scored file's result and heatmap."""

    results: list[Prediction] = field(default_factory=list)
    threshold: float | None = None
    overlays: list[Any] = field(default_factory=list)  # per file: an RGB array, or None where not scored
    status: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def shown(self) -> int | None:
        """The file shown first: the first one scored."""
        return next((index for index, result in enumerate(self.results) if result.scored), None)

    @property
    def overlay(self) -> Any:
        return None if self.shown is None else self.overlays[self.shown]

    def result_text(self, index: int | None = None) -> str:
        index = self.shown if index is None else index
        return "" if index is None else result_markdown(self.results[index], self.threshold)

    def table(self) -> dict[str, list]:
        """The table's value as Gradio's plain headers and rows: a pandas DataFrame here allocated its
        strings in Arrow's memory pool, which kept growing under load (docs/benchmarks.md, "Under load")."""
        rows = [[file_name(r), result_words(r), percent(r.probability), note_words(r)] for r in self.results]
        return {"headers": COLUMNS, "data": rows}


def predict_files(paths: list[str] | None, service: ModelService,
                  max_file_bytes: int = MAX_FILE_BYTES) -> Outcome:
    """The app's prediction logic: uploaded file paths in, a result and a heatmap per file out; never raises
    for bad input. A file over the size limit gets its own row; the others are scored."""
    paths = list(paths or [])
    if not paths:
        return Outcome(status=UPLOAD_PROMPT)
    if not service.ready:
        raise ModelUnavailableError(service.problem or "no model is loaded")
    predictor = service.predictor
    results = score_within_limit(predictor, paths[:MAX_FILES], max_file_bytes)
    results += [Prediction(p, None, None, predictor.threshold, TOO_MANY) for p in paths[MAX_FILES:]]
    overlays = [render_overlay(r, predictor) if r.scored else None for r in results]
    return Outcome(results, predictor.threshold, overlays, status_text(results), api_result(results, service))


def score_within_limit(predictor: Predictor, paths: list[str], max_file_bytes: int) -> list[Prediction]:
    """Predictions in upload order; a file over the limit is refused unread, with its size and the limit."""
    problems = [size_problem(Path(path), max_file_bytes) for path in paths]
    within = [Path(path) for path, problem in zip(paths, problems, strict=True) if problem is None]
    scored = iter(predictor.predict_paths(within, max_bytes=max_file_bytes, with_cam=True))
    return [next(scored) if problem is None else Prediction(path, None, None, predictor.threshold, problem)
            for path, problem in zip(paths, problems, strict=True)]


def size_problem(path: Path, limit: int) -> str | None:
    try:
        size = path.stat().st_size
    except OSError:
        return None  # the reader says what is wrong with it
    if size <= limit:
        return None
    return (f"file is {megabytes(size)}, over the {megabytes(limit)} limit: not scored. Export the X-ray at a "
            "smaller size (PNG or JPEG at its original resolution is usually a few MB)")


def upload_ceiling(max_file_bytes: int) -> int:
    """Gradio's own upload limit (`launch(max_file_size=...)`): above the per-file limit, which the app checks."""
    return UPLOAD_CEILING_FACTOR * max_file_bytes


def score_and_render(paths: list[str] | None, service: ModelService,
                     max_file_bytes: int) -> tuple[Outcome, list[str | None]]:
    """`predict_files`, then each heatmap written as a PNG: everything that allocates per image."""
    outcome = predict_files(paths, service, max_file_bytes)
    return outcome, [None if picture is None else workarounds.write_heatmap(picture) for picture in outcome.overlays]


def on_cpu_clock(function: Any, *args: Any) -> tuple[Any, float]:
    """`function(*args)` and the CPU seconds this thread spent in it: the app's own work per request, apart
    from Gradio's (the load benchmark reads it from the log)."""
    started = time.thread_time()
    return function(*args), time.thread_time() - started


def render_overlay(prediction: Prediction, predictor: Predictor) -> np.ndarray:
    grey = prediction.grey
    scale = OVERLAY_MAX_SIDE / max(grey.shape)
    if scale < 1:
        from scoring.imaging import resize_to

        grey = resize_to(grey, (round(grey.shape[0] * scale), round(grey.shape[1] * scale)))
    heat = heatmap(prediction.cam, grey.shape, prediction.label == predictor.decision.class_names[1],
                   predictor.decision.crop)
    return overlay(grey, heat)


def api_result(results: list[Prediction], service: ModelService) -> dict[str, Any]:
    """The structured result the API returns beside the display: the prediction record of each file
    (`Prediction.record()`, probabilities as fractions), its name and gate score, and the model."""
    decision = service.predictor.decision
    return {
        "model_name": decision.model_name, "model_version": decision.model_version,
        "model_source": model_source(service), "threshold": decision.threshold,
        "results": [{"file": file_name(r), **r.record(), "ood_score": r.ood_score} for r in results],
    }


def file_name(prediction: Prediction) -> str:
    return Path(prediction.name).name


def result_words(prediction: Prediction) -> str:
    """The decision in words: `Pneumonia, likely viral (71.0% probability viral)`, `Needs review by a reader`."""
    if not prediction.scored:
        return "Not scored"
    words = TRIAGE_WORDS.get(prediction.triage or prediction.label, prediction.label)
    if prediction.triage == REVIEW:
        words += f" ({prediction.label} at the threshold)"
    if prediction.subtype:
        words += (f", likely {prediction.subtype.lower()} "
                  f"({percent(prediction.probability_viral)} probability viral)")
    return words


def note_words(prediction: Prediction) -> str:
    """The note column: why a file was not scored and what to do, or how it was put upright."""
    parts = [with_next_step(prediction.error)] if prediction.error else []
    return "; ".join(parts + ([prediction.note] if prediction.note else []))


def with_next_step(error: str) -> str:
    """A refusal with what to do about it (messages that already say so are kept as they are)."""
    if any(word in error for word in ("Send ", "Export ", "upload a single")):
        return error
    step = next((advice for fragment, advice in NEXT_STEPS.items() if fragment in error.lower()), DEFAULT_NEXT_STEP)
    return f"{error}. {step}"


def result_markdown(prediction: Prediction, threshold: float) -> str:
    """The selected file's result: the decision once, as a heading, then the figures behind it."""
    name = f"`{_md_safe(file_name(prediction))}`"
    if not prediction.scored:
        return f"### Not scored\n\n{name}: {note_words(prediction)}."
    figures = (f"{name}: probability of pneumonia **{percent(prediction.probability)}**; at the decision "
               f"threshold of {percent(threshold)} the model's label is **{prediction.label}**.")
    lines = [f"### {result_words(prediction)}", figures]
    if prediction.triage == REVIEW:
        lines.append("The probability is in the uncertain band: a reader should review this X-ray.")
    if prediction.note:
        lines.append(f"*Note: {prediction.note}.*")
    return "\n\n".join(lines)


def status_text(results: list[Prediction]) -> str:
    scored = sum(r.scored for r in results)
    lines = [f"Scored {scored} of {len(results)} file{'s' if len(results) != 1 else ''}."]
    if scored and len(results) > 1:
        lines[0] += " Choose a row in the table to see that file's result and map."
    for result in results:
        if not result.scored:
            lines.append(f"- `{_md_safe(file_name(result))}`: {note_words(result)}")
    return "\n".join(lines)


def _md_safe(text: str) -> str:
    return text.replace("`", "'")


def no_model_message(service: ModelService) -> str:
    """One line for an error toast or an API client: why nothing can be scored, and the remedy."""
    remedy = "" if "make repro" in (service.problem or "") else (
        " Train and register one with `make repro`, then restart the app.")
    return f"No model is loaded, so nothing can be scored: {service.problem}.{remedy}"


def model_source(service: ModelService) -> str:
    """Where the served model came from, as the page names it: a registry URI, or an exported folder's
    name (never a server path)."""
    uri = service.uri or production_uri()
    return uri if uri.startswith("models:/") else f"exported folder {Path(uri).name or uri}"


def model_panel(service: ModelService) -> str:
    if not service.ready:
        return f"## No model is loaded\n\n{service.problem}\n{TRAINING_HELP}\n**Training data:** {DATA_SOURCE}\n\n{NOT_A_DEVICE}"
    decision = service.predictor.decision
    version = f" (version {decision.model_version})" if decision.model_version else ""
    return f"*Served from `{model_source(service)}`{version}.*\n\n{card_markdown(decision)}"


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


class SessionViews:
    """Each browser session's last results, for choosing a row: per file its result text and heatmap path
    (a few short strings, in memory only), for at most MAX_SESSIONS sessions; dropped when the page closes."""

    MAX_SESSIONS = 256

    def __init__(self) -> None:
        self._views: OrderedDict[str, list[tuple[str, str | None]]] = OrderedDict()
        self._lock = threading.Lock()

    def keep(self, session: str, views: list[tuple[str, str | None]]) -> None:
        with self._lock:
            self._views[session] = views
            self._views.move_to_end(session)
            while len(self._views) > self.MAX_SESSIONS:
                self._views.popitem(last=False)

    def get(self, session: str, row: int) -> tuple[str, str | None] | None:
        with self._lock:
            views = self._views.get(session, [])
            return views[row] if 0 <= row < len(views) else None

    def drop(self, session: str) -> None:
        with self._lock:
            self._views.pop(session, None)


def create_demo(service: ModelService, max_file_bytes: int = MAX_FILE_BYTES) -> gr.Blocks:
    """The app around one model service (loaded on first use)."""
    delete_cache = upload_cache_policy()
    # All model work on one thread: Gradio runs events on any of its ~40 worker threads, and every thread
    # that touches ONNX Runtime and PIL grows its own allocator arena. The queue runs one event at a time.
    model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
    views = SessionViews()

    def on_predict(paths: str | list[str] | None, request: gr.Request | None = None) -> tuple[Any, ...]:
        if isinstance(paths, str):
            paths = [paths]  # the single-file /predict endpoint
        if paths and not service.ready:  # clearing the upload box (no paths) just blanks the results
            raise gr.Error(no_model_message(service), print_exception=False)
        started = time.perf_counter()
        try:
            (outcome, heatmaps), cpu = model_thread.submit(on_cpu_clock, score_and_render, paths, service,
                                                           max_file_bytes).result()
        except Exception as error:
            # Never the image or its metadata in the log: only what went wrong in our code.
            log.exception("prediction failed")
            raise gr.Error("Scoring failed unexpectedly; the error was logged on the server.",
                           print_exception=False) from error
        failed = sum(not r.scored for r in outcome.results)
        log.info("scored %d of %d files in %.0f ms (%.1f ms CPU)", len(outcome.results) - failed,
                 len(outcome.results), 1000 * (time.perf_counter() - started), 1000 * cpu)
        if request is not None:
            views.keep(request.session_hash, [(outcome.result_text(index), path) for index, path in enumerate(heatmaps)])
        shown = outcome.shown
        return (outcome.result_text(), None if shown is None else heatmaps[shown], outcome.table(),
                outcome.status, outcome.details)

    def on_select(event: gr.SelectData, request: gr.Request) -> tuple[Any, Any]:
        row = event.index[0] if isinstance(event.index, (list, tuple)) else event.index
        view = views.get(request.session_hash, row)
        return (gr.update(), gr.update()) if view is None else view

    def on_unload(request: gr.Request) -> None:
        views.drop(request.session_hash)

    def on_page_load() -> tuple[Any, Any, Any]:
        ready = service.ready
        return (gr.update(value=model_panel(service)), gr.update(interactive=ready),
                gr.update(value="" if ready else f"## No model is loaded\n\n{service.problem}", visible=not ready))

    with gr.Blocks(title="Pneumonia screening (research demo)", analytics_enabled=False,
                   delete_cache=delete_cache) as demo:
        gr.Markdown(HEADER.format(max_mb=megabytes(max_file_bytes)))
        no_model = gr.Markdown(visible=False, elem_id="no-model")
        with gr.Row():
            with gr.Column():
                # No file_types filter: every upload reaches our own checks, so a wrong file gets a
                # specific message (and extension-less DICOM files still work).
                files = workarounds.UploadBox(label="Chest X-rays (PNG, JPEG or DICOM)", file_count="multiple",
                                              type="filepath", elem_id="upload").with_api_example(api_example())
                run = gr.Button("Screen again", variant="primary", elem_id="screen")
                gr.Markdown("Files are scored as soon as they are uploaded; **Screen again** scores them anew.")
            with gr.Column():
                result = gr.Markdown(label=RESULT_TITLE, elem_id="result-label", container=True)
                heat = gr.Image(label="Where the model looked (not where a lesion is)", type="filepath",
                                format="png", interactive=False, elem_id="heatmap")
                gr.Markdown(CAM_CAPTION)
        status = gr.Markdown(label="Summary", elem_id="status")
        table = gr.Dataframe(headers=COLUMNS, interactive=False, wrap=True, label="All files (choose a row)",
                             column_widths=["28%", "30%", "16%", "26%"], max_height=4000, elem_id="results")
        with gr.Accordion("Result as JSON (what the API returns)", open=False):
            details = gr.JSON(label="Structured result (JSON)", elem_id="details")
        outputs = [result, heat, table, status, details]
        examples = sorted(EXAMPLES_DIR.glob("*.png"))
        if examples:
            # Clicking one fills the upload box, whose change event scores it: one click in all.
            gr.Examples([[[str(path)]] for path in examples], inputs=[files], cache_examples=False,
                        example_labels=[_example_label(path) for path in examples],
                        label="Examples (from the training data: one click scores them)")
        gr.Markdown(CHECKS_MARKDOWN)
        with gr.Accordion("About the model", open=True):
            panel = gr.Markdown("Loading the model...", elem_id="model-card")
        # /predict takes one file (`client.predict(handle_file(path), api_name="/predict")`), /predict_files
        # a list. The one-file input is never shown; it only gives /predict its type. All share one
        # concurrency group, so the queue's limit bounds the model's work, not each event's.
        single = workarounds.UploadBox(label="Chest X-ray (PNG, JPEG or DICOM)", file_count="single",
                                       type="filepath", visible=False).with_api_example(api_example())
        single.upload(on_predict, inputs=[single], outputs=outputs, api_name="predict", concurrency_id="model",
                      api_description=API_DESCRIPTION.format(what="one chest X-ray"))
        run.click(on_predict, inputs=[files], outputs=outputs, api_name="predict_files", concurrency_id="model",
                  api_description=API_DESCRIPTION.format(what=f"up to {MAX_FILES} chest X-rays")
                  ).success(None, js=SHOW_RESULT_JS, api_visibility="private")
        files.change(on_predict, inputs=[files], outputs=outputs, api_visibility="private", concurrency_id="model"
                     ).success(None, js=SHOW_RESULT_JS, api_visibility="private")
        table.select(on_select, outputs=[result, heat], api_visibility="private", queue=False,
                     scroll_to_output=True)
        demo.unload(on_unload)
        demo.load(on_page_load, outputs=[panel, run, no_model], api_visibility="private")
    # The "On this device" page: the same model in the visitor's browser (serving/ondevice.py).
    ondevice.add_page(demo, service, max_file_bytes, max_files=MAX_FILES, overlay_max_side=OVERLAY_MAX_SIDE)
    workarounds.bound_queue_analytics()
    demo.queue(default_concurrency_limit=CONCURRENCY, max_size=QUEUE_SIZE)
    return demo


def api_example() -> str | None:
    """The example the API page's snippets send: a file of examples/, relative to the project folder."""
    examples = sorted(EXAMPLES_DIR.glob("*.png"))
    return examples[0].relative_to(APP_DIR).as_posix() if examples else None


def page_options(max_file_bytes: int) -> dict[str, Any]:
    """Keyword arguments for `demo.launch(...)`: Gradio's upload ceiling, the page's style and head."""
    return {"max_file_size": upload_ceiling(max_file_bytes), "css": PAGE_CSS, "head": PAGE_HEAD}


def launch_options(demo: gr.Blocks, max_file_bytes: int) -> dict[str, Any]:
    """`page_options` and the on-device page's routes (what the tests launch with)."""
    return {**page_options(max_file_bytes), **ondevice.launch_options(demo)}


def _example_label(path: Path) -> str:
    """`pneumonia-viral_person1007_virus_1690.png` -> `Pneumonia (viral)`."""
    kind, _, detail = path.stem.split("_", 1)[0].partition("-")
    return kind.capitalize() + (f" ({detail})" if detail else "")


def parse_args(argv: list[str]) -> argparse.Namespace:
    return command_line.parse_args(argv, SHIPPED_MODEL_DIR, __doc__.split("\n\n")[0])


def launch(app: gr.Blocks, settings: argparse.Namespace) -> None:
    app.launch(server_name=settings.host, server_port=settings.port, share=settings.share, show_error=False,
               prevent_thread_lock=True, quiet=True, **page_options(int(settings.max_file_mb * 1_000_000)),
               # The REST route (serving/rest.py) beside the on-device page's, around the same model.
               **rest.launch_options(ondevice.launch_options(app), SERVICE,
                                     int(settings.max_file_mb * 1_000_000), MAX_FILES))
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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own start-up probes
    CACHE = workarounds.private_cache()
    workarounds.purge_on_exit(CACHE)
    tune_malloc()  # before Gradio starts its worker threads
else:
    SETTINGS = parse_args([])  # imported (tests, `gradio app.py`): the environment fallbacks apply
    PREFETCH = None
SERVICE = ModelService(SETTINGS.model_uri, PREFETCH)
demo = create_demo(SERVICE, max_file_bytes=int(SETTINGS.max_file_mb * 1_000_000))

if __name__ == "__main__":
    SERVICE.load()
    try:
        launch(demo, SETTINGS)
    finally:
        workarounds.purge_cache(CACHE)
