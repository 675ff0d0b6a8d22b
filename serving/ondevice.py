"""On-device screening: the production model runs in the visitor's browser and the image never leaves it.

The app gets a second page, "On this device" (`add_page`), beside the server page. Its script (the ES
modules in `serving/web/`) fetches three things from this server, once per page load, and nothing else:

- `/ondevice/config.json`: the decision metadata, read from the served artefact through `scoring.decision`
  (threshold, input size, crop, class names, the out-of-distribution limit, triage band, subtype threshold,
  orientation confidence), plus the limits and plausibility checks of `scoring.pixels` / `scoring.checks`,
  the overlay palette of `serving.overlay` and the words the server uses (`words`: orientation names from
  `scoring.orientation`, the refusals of `scoring.decision`), so the page decides exactly as the server does;
- `/ondevice/model.onnx`: the bytes of the ONNX serving artefact the server itself loaded;
- `/ondevice/<asset>`: one of a fixed list of files: the page's modules, and ONNX Runtime Web's module and
  WebAssembly binary and dicom-parser, copied from npm into `serving/web/vendor/` by `make web` (no CDN).

The page then decodes, checks, resizes and scores files in memory (ONNX Runtime Web, WebAssembly backend,
one thread). Routes serve no path taken from a request: an asset name is looked up in the fixed list.

Gradio builds its FastAPI app at launch, so the routes reach it through `launch(**launch_options(demo))`
(FastAPI's own `routes` argument, passed by Gradio's `app_kwargs`).
"""

from __future__ import annotations

import html
import json
import logging
import math
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

from scoring import checks, pixels, wording
from scoring.card import NOT_A_DEVICE
from scoring.decision import (
    CAM_OUTPUT,
    INPUT_NAME,
    OOD_OUTPUT,
    ORIENTATION_OUTPUT,
    PROBABILITY_OUTPUT,
    REVIEW,
    SUBTYPE_NAMES,
    VIRAL_OUTPUT,
    Decision,
)
from scoring.orientation import ORIENTATIONS, UPRIGHT
from scoring.runtime import RECORD_FIELDS, UPRIGHT_NOTE, ServingArtefact
from serving import overlay
from serving.service import Served
from serving.settings import MAX_FILES

log = logging.getLogger(__name__)

PREFIX = "/ondevice"
PAGE_NAME = "On this device"
PAGE_PATH = "on-device"
MAIN_PAGE_NAME = "On the server"
WEB_DIR = Path(__file__).parent / "web"
VENDOR_DIR = WEB_DIR / "vendor"
# The page's own ES modules, and what `make web` copies from node_modules: the only files served.
MODULES = ("ondevice.js", "imaging.js", "decode.js", "dicom.js", "decision.js")
ORT_MODULE = "ort.wasm.min.mjs"  # ONNX Runtime Web, WebAssembly backend only
ORT_WASM = ("ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")  # loaded by ORT_MODULE
DICOM_PARSER = "dicomParser.min.js"
VENDOR_FILES = (ORT_MODULE, *ORT_WASM, DICOM_PARSER)
MEDIA_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm"}
NO_STORE = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
REVALIDATE = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
# The way out this page offers beside a refusal's next step (scoring.wording.with_next_step), and when it
# cannot score at all.
SERVER_PAGE = f"use the “{MAIN_PAGE_NAME}” page"
INSTEAD = f"{SERVER_PAGE} instead"
# Where the page's status line says its files were scored (scoring.wording.scored_line).
WHERE = " on this device"
# Where a program finds the server's API: FastAPI's docs when the app has them, else Gradio's API page.
API_PAGE = "?view=api"

INTRO = f"""
# Screen on this device

The model runs **in this browser** (ONNX Runtime Web on WebAssembly): the X-ray is read, checked and
scored on this device and **never uploaded**. This page downloads the model and its decision threshold
once; after that it works offline. Same model, threshold and preprocessing as the server page
(**{MAIN_PAGE_NAME}**), which stays available, and which also reads TIFF, BMP, GIF and WebP files and
compressed DICOM.

> {NOT_A_DEVICE}
"""

FOOTNOTE = f"""
**What stays on this device:** the image, its file name and every result. The requests this page makes are
for the model, its metadata and the runtime, all from this server; none carries anything about an image.
{checks.CHECKS_TEXT} The map shows where the model looked, **not where a lesion is**.
"""

# The page's markup; ondevice.js fills it. Ids are what the tests and the script look for. The results table
# turns into one block per file on a narrow screen (PAGE_CSS), so every decision fits a phone's width.
PAGE_HTML = """
<div id="ondevice" class="ondevice" data-instead="%(instead)s">
  <p id="ondevice-status" role="status">Starting on-device screening...</p>
  <div id="ondevice-drop" class="ondevice-drop">
    <label for="ondevice-files">Chest X-rays (PNG, JPEG or DICOM), read on this device:</label>
    <input id="ondevice-files" type="file" multiple disabled>
  </div>
  <section id="ondevice-result" class="ondevice-result" tabindex="-1" aria-label="Results">
    <p id="ondevice-label"></p>
    <canvas id="ondevice-heatmap" hidden role="img"
            aria-label="Where the model looked (not where a lesion is)"></canvas>
    <div id="ondevice-summary"></div>
    <table id="ondevice-results" hidden>
      <caption>Every file's result</caption>
      <thead><tr><th scope="col">File</th><th scope="col">Probability of pneumonia</th><th scope="col">Result</th>
        <th scope="col">Triage</th><th scope="col">Subtype</th><th scope="col">Probability viral</th>
        <th scope="col">Note</th></tr></thead>
      <tbody></tbody>
    </table>
    <p id="ondevice-timing"></p>
  </section>
  <p id="ondevice-api">For programs: <a id="ondevice-api-link" href="./?view=api">the server's API
    documentation</a> (this page has no API of its own: it sends nothing to the server).</p>
  <noscript>On-device screening needs JavaScript: %(instead)s.</noscript>
</div>
"""

# Scoped to the component by Gradio (css_template). Narrow screens: no fixed widths, the table stacks.
PAGE_CSS = """
.ondevice { max-width: 100%; overflow-wrap: break-word; }
.ondevice td:first-child, .ondevice #ondevice-summary { overflow-wrap: anywhere; }
.ondevice #ondevice-status { font-weight: 600; }
.ondevice .ondevice-drop { border: 1px dashed #777; border-radius: 8px; padding: 16px; margin: 8px 0;
  box-sizing: border-box; max-width: 100%; }
.ondevice .ondevice-drop label { display: block; margin-bottom: 8px; }
.ondevice input[type=file] { display: block; box-sizing: border-box; max-width: 100%; width: 100%; }
.ondevice #ondevice-label { font-size: 1.2em; font-weight: 600; }
.ondevice canvas { display: block; max-width: 100%; height: auto; }
.ondevice canvas[hidden], .ondevice table[hidden] { display: none; }
.ondevice table { width: 100%; border-collapse: collapse; table-layout: auto; }
.ondevice caption { text-align: left; font-weight: 600; padding: 4px 0; }
.ondevice th, .ondevice td { text-align: left; vertical-align: top; padding: 4px 6px;
  border-bottom: 1px solid #ccc; }
.ondevice #ondevice-timing { color: #555; }
.ondevice a { text-decoration: underline; }
.ondevice input:focus-visible, .ondevice a:focus-visible { outline: 3px solid #1a56db; outline-offset: 2px; }
.ondevice section:focus { outline: none; }
.ondevice .ondevice-drop:focus-within { border-color: #1a56db; border-style: solid; }
@media (max-width: 640px) {
  .ondevice table, .ondevice tbody, .ondevice tr, .ondevice td, .ondevice caption { display: block; width: 100%;
    box-sizing: border-box; }
  .ondevice thead { position: absolute; width: 1px; height: 1px; overflow: hidden; clip: rect(0 0 0 0); }
  .ondevice tr { border: 1px solid #ccc; border-radius: 6px; margin: 8px 0; padding: 4px 0; }
  .ondevice td { border: none; padding: 2px 8px; }
  .ondevice td:empty { display: none; }
  .ondevice td::before { content: attr(data-label) ": "; font-weight: 600; }
}
"""

# Runs once the HTML component is on the page (Gradio's js_on_load, with `element` the component).
MOUNT_JS = """
const root = ((window.gradio_config && window.gradio_config.root) || window.location.origin).replace(/\\/+$/, "");
const base = root + "%(prefix)s/";
import(base + "ondevice.js").then((module) => module.mount(element, base)).catch((error) => {
  const line = element.querySelector("#ondevice-status");
  const instead = element.querySelector("#ondevice").dataset.instead;
  const text = "The on-device page could not start (" + ((error && error.message) || error) + "): " + instead + ".";
  if (line) line.textContent = text;
  window.pneumoniaOnDevice = { status: "failed", message: text };
});
"""

_ROUTES: weakref.WeakKeyDictionary[gr.Blocks, list[BaseRoute]] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class PageSettings:
    """The app's limits, which the page applies as the server does."""

    max_file_bytes: int = pixels.MAX_FILE_BYTES
    max_files: int = MAX_FILES
    overlay_max_side: int = overlay.OVERLAY_MAX_SIDE


def add_page(demo: gr.Blocks, service: Served, settings: PageSettings | None = None) -> None:
    """Add the "On this device" page to `demo` (call after its `with gr.Blocks()` block) and remember the
    routes it needs, which `launch_options(demo)` hands to `launch`."""
    settings = settings or PageSettings()
    with demo:
        gr.Navbar(main_page_name=MAIN_PAGE_NAME)
    with demo.route(PAGE_NAME, PAGE_PATH):
        gr.Navbar(main_page_name=MAIN_PAGE_NAME)  # one per page
        gr.Markdown(INTRO)
        gr.HTML(PAGE_HTML % {"instead": html.escape(INSTEAD)}, css_template=PAGE_CSS,
                js_on_load=MOUNT_JS % {"prefix": PREFIX}, elem_id="ondevice-page", apply_default_css=True)
        gr.Markdown(FOOTNOTE)
    _ROUTES[demo] = routes(service, settings)


def launch_options(demo: gr.Blocks) -> dict[str, Any]:
    """Keyword arguments for `demo.launch(...)` that add the on-device routes ({} without the page)."""
    found = _ROUTES.get(demo)
    return {"app_kwargs": {"routes": list(found)}} if found else {}


def assets_built() -> bool:
    """Whether `make web` has put the runtime files in serving/web/vendor/."""
    return all((VENDOR_DIR / name).is_file() for name in VENDOR_FILES)


def asset_paths() -> dict[str, Path]:
    """Every file the asset route may serve, by the name in its URL."""
    return {**{name: WEB_DIR / name for name in MODULES}, **{name: VENDOR_DIR / name for name in VENDOR_FILES}}


def runtime_versions() -> dict[str, str]:
    """The pinned npm packages (serving/web/package.json), for the page and the docs."""
    try:
        return dict(json.loads((WEB_DIR / "package.json").read_text())["dependencies"])
    except (OSError, ValueError, KeyError):
        return {}


def overlay_palette() -> list[int]:
    """The server's jet colour table (serving.overlay), 256 RGB triples, as the page draws them."""
    levels = overlay.colourise(np.arange(256, dtype=np.float32) / 255.0)
    return np.round(levels).astype(np.uint8).ravel().tolist()


class ModelNotServable(RuntimeError):
    """The page cannot get the model: a one-line reason."""


def served_artefact(service: Served) -> ServingArtefact:
    """The artefact the server scores with: its bytes are what the page gets. Raises ModelNotServable."""
    if not service.ready:
        raise ModelNotServable(wording.no_model(service.problem, " on the server"))
    return service.predictor.artefact


def page_config(service: Served, settings: PageSettings) -> dict[str, Any]:
    """What the page needs to decide as the server does. Raises ModelNotServable."""
    if not assets_built():
        raise ModelNotServable("the on-device runtime is not built on this server (run `make web`)")
    artefact = served_artefact(service)
    return {
        "decision": json.loads(artefact.decision.to_json()),
        "model": {"url": "model.onnx", "bytes": len(artefact.onnx_bytes), "sha256": artefact.sha256},
        "tensors": {"input": INPUT_NAME, "probability": PROBABILITY_OUTPUT, "cam": CAM_OUTPUT, "ood": OOD_OUTPUT,
                    "viral": VIRAL_OUTPUT, "orientation": ORIENTATION_OUTPUT},
        "words": page_words(artefact.decision, settings),
        "record_fields": list(RECORD_FIELDS),
        "limits": {"max_file_bytes": settings.max_file_bytes, "max_pixels": pixels.MAX_PIXELS,
                   "min_side": pixels.MIN_SIDE, "max_files": settings.max_files,
                   # Past this, Pillow refuses a file as a decompression bomb as it opens it (its own message).
                   "bomb_pixels": 2 * Image.MAX_IMAGE_PIXELS},
        "checks": {"max_aspect": checks.MAX_ASPECT, "min_pixel_std": checks.MIN_PIXEL_STD,
                   "colour_spread_limit": checks.COLOUR_SPREAD_LIMIT, "colour_probe_size": checks.COLOUR_PROBE_SIZE},
        "overlay": {"alpha": overlay.OVERLAY_ALPHA, "max_side": settings.overlay_max_side,
                    "palette": overlay_palette()},
        "runtime": {"ort": ORT_MODULE, "dicom_parser": DICOM_PARSER, "versions": runtime_versions()},
    }


def page_words(decision: Decision, settings: PageSettings) -> dict[str, Any]:
    """The server's words the page shows, read from the Python modules (never retyped in JavaScript): the
    decision's names and refusals, and `scoring.wording`'s sentences, which the page fills in as the server
    page does (`{name}` fields, Python's str.format)."""
    return {
        "orientations": list(ORIENTATIONS), "upright": UPRIGHT, "upright_note": UPRIGHT_NOTE,
        "review": REVIEW, "subtypes": list(SUBTYPE_NAMES),
        "orientation_unclear": Decision.orientation_unclear(),
        # The gate's refusal (None without a gate): its sentence does not depend on the score.
        "gate_refusal": decision.refusal(math.inf),
        "percent_floor": wording.PERCENT_FLOOR, "percent_ceiling": wording.PERCENT_CEILING,
        "action_words": list(wording.ACTION_WORDS), "next_steps": [list(pair) for pair in wording.NEXT_STEPS],
        "default_next_step": wording.DEFAULT_NEXT_STEP, "alternative": SERVER_PAGE,
        "decision": wording.DECISION, "triage_part": wording.TRIAGE_PART, "subtype_part": wording.SUBTYPE_PART,
        "scored": wording.SCORED, "where": WHERE, "refused": wording.REFUSED, "not_scored": wording.NOT_SCORED,
        "too_many_files": wording.too_many_files(settings.max_files),
    }


def api_docs_path(app: Any) -> str:
    """The server's API documentation, relative to the app's root: FastAPI's /docs where the app has them
    (a REST endpoint), else Gradio's "Use via API" page of the server page."""
    docs = getattr(app, "docs_url", None)
    return docs.lstrip("/") if docs else API_PAGE


def routes(service: Served, settings: PageSettings | None = None) -> list[BaseRoute]:
    """The page's routes, under PREFIX: config.json, model.onnx and the fixed list of assets."""
    settings = settings or PageSettings()
    files = asset_paths()

    def config(request: Request) -> Response:
        try:
            found = page_config(service, settings)
            found["api_docs"] = api_docs_path(request.scope.get("app"))
            return JSONResponse(found, headers=NO_STORE)
        except ModelNotServable as error:
            return JSONResponse({"error": str(error)}, status_code=503, headers=NO_STORE)
        except Exception:  # a broken store must not take the page down: say so in one line
            log.exception("the on-device page's configuration failed")
            return JSONResponse({"error": "the server could not prepare the model for this page"},
                                status_code=503, headers=NO_STORE)

    def model(request: Request) -> Response:
        try:
            artefact = served_artefact(service)
        except ModelNotServable as error:
            return JSONResponse({"error": str(error)}, status_code=503, headers=NO_STORE)
        # The bytes the server's own session was built from, kept in memory: never a file read again (a
        # registry model's download is gone once loaded), so the page cannot get another model than this one.
        etag = f'"{artefact.sha256}"'
        headers = {**REVALIDATE, "ETag": etag}
        if etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        return Response(artefact.onnx_bytes, media_type="application/octet-stream", headers=headers)

    def asset(request: Request) -> Response:
        path = files.get(request.path_params["name"])
        if path is None or not path.is_file():
            return Response("Not Found", status_code=404, media_type="text/plain")
        stat = path.stat()
        etag = f'"{stat.st_mtime_ns:x}-{stat.st_size:x}"'
        headers = {**REVALIDATE, "ETag": etag}
        if etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=headers)

    return [
        Route(f"{PREFIX}/config.json", config, methods=["GET"]),
        Route(f"{PREFIX}/model.onnx", model, methods=["GET"]),
        Route(f"{PREFIX}/{{name}}", asset, methods=["GET"]),
    ]
