"""The server page ("On the server"): uploads scored on the server, with the class-activation map, the table,
the JSON and the model card. Its Blocks, style and scripts; what a request shows is `serving.results`.

One page per module, as Gradio's multipage guide lays an app out: `build` makes this page (the app's main
page, at `/`), and `serving.ondevice.add_page` adds the other.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import gradio as gr

from scoring.card import NOT_A_DEVICE
from scoring.checks import CHECKS_TEXT
from scoring.pixels import MAX_FILE_BYTES
from scoring.wording import megabytes
from serving import gradio_workarounds as workarounds
from serving.results import COLUMNS, Outcome, model_panel, no_model_banner, no_model_message, predict_files
from serving.service import ModelService
from serving.settings import MAX_FILES

log = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parent.parent  # app.py's folder, here or in a Space
EXAMPLES_DIR = APP_DIR / "examples"
# Gradio refuses a whole upload when one file is over its limit: it gets this multiple of the per-file
# limit, so a file over the per-file limit still arrives and gets its own row (and the others are scored).
UPLOAD_CEILING_FACTOR = 5
# Every minute, delete uploads and rendered heatmaps older than five minutes.
DELETE_CACHE = (60, 300)
UPLOAD_TTL_ENV = "PNEUMONIA_UPLOAD_TTL_S"  # another age in seconds, swept every min(60, age) seconds

RESULT_TITLE = "Result of the selected file"
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
    "the table of all files (probabilities in percent), a summary (Markdown), and the structured result (JSON), "
    "as `POST /api/v1/predict` answers: the model (name, version, threshold) and per file its `name` and the "
    "prediction record (probability_pneumonia, label, error, triage, subtype, probability_viral, note, "
    "ood_score); probabilities are fractions from 0 to 1. Not a medical device."
)


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


def upload_ceiling(max_file_bytes: int) -> int:
    """Gradio's own upload limit (`launch(max_file_size=...)`): above the per-file limit, which the app checks."""
    return UPLOAD_CEILING_FACTOR * max_file_bytes


def page_options(max_file_bytes: int) -> dict[str, Any]:
    """Keyword arguments for `demo.launch(...)`: Gradio's upload ceiling, the page's style and head."""
    return {"max_file_size": upload_ceiling(max_file_bytes), "css": PAGE_CSS, "head": PAGE_HEAD}


def score_and_render(paths: list[str] | None, service: ModelService,
                     max_file_bytes: int) -> tuple[Outcome, list[str | None]]:
    """`predict_files`, then each heatmap written as a PNG: everything that allocates per image."""
    outcome = predict_files(paths, service, max_file_bytes)
    return outcome, [None if picture is None else workarounds.write_heatmap(picture) for picture in outcome.overlays]


def on_cpu_clock(function: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """`function(*args)` and the CPU seconds this thread spent in it: the app's own work per request, apart
    from Gradio's (the load benchmark reads it from the log)."""
    started = time.thread_time()
    return function(*args), time.thread_time() - started


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


def build(service: ModelService, max_file_bytes: int = MAX_FILE_BYTES) -> gr.Blocks:
    """The server page around one model service (loaded on first use); the app's Blocks."""
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
                gr.update(value="" if ready else no_model_banner(service), visible=not ready))

    with gr.Blocks(title="Pneumonia screening (research demo)", analytics_enabled=False,
                   delete_cache=upload_cache_policy()) as demo:
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
    return demo


def api_example() -> str | None:
    """The example the API page's snippets send: a file of examples/, relative to the project folder."""
    examples = sorted(EXAMPLES_DIR.glob("*.png"))
    return examples[0].relative_to(APP_DIR).as_posix() if examples else None


def _example_label(path: Path) -> str:
    """`pneumonia-viral_person1007_virus_1690.png` -> `Pneumonia (viral)`."""
    kind, _, detail = path.stem.split("_", 1)[0].partition("-")
    return kind.capitalize() + (f" ({detail})" if detail else "")
