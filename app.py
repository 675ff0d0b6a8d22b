"""Gradio app: pneumonia screening of paediatric chest X-rays, with a class-activation map and the model card.

    python app.py [--model-uri URI] [--host 127.0.0.1] [--port 7860] [--share]

It serves the registered model's ONNX serving artefact (`scoring.runtime`): no TensorFlow, and MLflow
only to resolve a `models:/` URI (run as a script: in a helper process, while Gradio is imported).
Importing this module builds `demo` (what `gradio app.py` reloads) and nothing else; the model loads on
first use, or before launch when run as a script. The pages live in `serving/`: the server page
(`serving.server_page`, its results in `serving.results`), the on-device page (`serving.ondevice`) and the
REST route (`serving.rest`), all around one model service (`serving.service`). Research demo: not a
medical device.
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
from typing import Any

import gradio as gr

from scoring.logs import setup_logging
from scoring.pixels import MAX_FILE_BYTES
from serving import gradio_workarounds as workarounds
from serving import ondevice, rest, server_page
from serving.service import ModelService
from serving.settings import MAX_FILES

log = logging.getLogger("app")

# Two cores: one request at a time, and a bounded number waiting ("Queue is full" beyond that).
CONCURRENCY = 1
QUEUE_SIZE = 32
M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8  # glibc's mallopt parameter numbers (malloc.h)
MALLOC_ARENAS = 2
MMAP_THRESHOLD_BYTES = 128 * 1024


def create_demo(service: ModelService, max_file_bytes: int = MAX_FILE_BYTES) -> gr.Blocks:
    """The app around one model service (loaded on first use): the server page, then the on-device page."""
    demo = server_page.build(service, max_file_bytes)
    ondevice.add_page(demo, service, ondevice.PageSettings(max_file_bytes=max_file_bytes))
    workarounds.bound_queue_analytics()
    demo.queue(default_concurrency_limit=CONCURRENCY, max_size=QUEUE_SIZE)
    return demo


def launch_options(demo: gr.Blocks, max_file_bytes: int) -> dict[str, Any]:
    """The server page's options and the on-device page's routes (what the tests launch with)."""
    return {**server_page.page_options(max_file_bytes), **ondevice.launch_options(demo)}


def parse_args(argv: list[str]) -> argparse.Namespace:
    return command_line.parse_args(argv, SHIPPED_MODEL_DIR, __doc__.split("\n\n")[0])


def launch(app: gr.Blocks, settings: argparse.Namespace) -> None:
    max_file_bytes = int(settings.max_file_mb * 1_000_000)
    # The REST route (serving/rest.py) beside the on-device page's routes, around the same model.
    options = rest.launch_options(launch_options(app, max_file_bytes), SERVICE, max_file_bytes, MAX_FILES)
    app.launch(server_name=settings.host, server_port=settings.port, share=settings.share, show_error=False,
               prevent_thread_lock=True, quiet=True, **options)
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
    setup_logging()
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
