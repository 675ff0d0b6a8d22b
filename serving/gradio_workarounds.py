"""Where the app works around Gradio 6.31, kept apart so each can go when Gradio fixes it.

- `UploadBox`: `gr.File` without the empty temporary file it leaks per uploaded file, and with an API
  example that is one of the app's own example files.
- `write_heatmap`: an output image written once and atomically (Gradio rewrites array outputs in place).
- `bound_queue_analytics`: the queue's monitoring summary kept small and computed now and then, not over
  the last 10,000 events with pandas after every event.
- `private_cache` / `purge_cache`: uploads and heatmaps in a folder of this process only, deleted when it
  stops (SIGTERM, SIGINT, Ctrl-C or a normal exit), and folders left by killed processes swept at start;
  Gradio's own `delete_cache` only sweeps while the app runs.
"""

from __future__ import annotations

import atexit
import hashlib
import io
import logging
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from gradio.utils import NamedString, get_upload_folder
from PIL import Image

log = logging.getLogger(__name__)

CACHE_PREFIX = "pneumonia-app-"


class UploadBox(gr.File):
    """`gr.File`, less a Gradio 6.31 leak: with type="filepath" its preprocessing opens an empty
    `NamedTemporaryFile(delete=False)` in the upload cache for every file of every request, and nothing
    ever deletes it (`delete_cache` tracks only the files Gradio hands out). The path passed on is the
    upload's own cached copy, exactly as before."""

    is_template = True  # drawn by the frontend's File component, as a gr.File
    api_example: str | None = None

    def _process_single_file(self, f: Any) -> Any:
        if self.type == "filepath" and not self.file_types:
            return NamedString(f.path)
        return super()._process_single_file(f)

    def with_api_example(self, path: str | None) -> UploadBox:
        """Have the API page's snippets send `path` (relative to where the client runs) instead of Gradio's
        sample PDF from the internet, which the app would refuse."""
        self.api_example = path
        return self

    def example_payload(self) -> Any:
        if self.api_example is None:
            return super().example_payload()
        # The API page writes `handle_file('<url>')` for a FileData with a url: here a relative path.
        payload = {"path": self.api_example, "url": self.api_example, "orig_name": Path(self.api_example).name,
                   "meta": {"_type": "gradio.FileData"}}
        return payload if self.file_count == "single" else [payload]

    def example_value(self) -> Any:
        if self.api_example is None:
            return super().example_value()
        return self.api_example if self.file_count == "single" else [self.api_example]


# Events the queue keeps for its monitoring summary, and how often (in events) it is recomputed.
ANALYTICS_EVENTS_KEPT = 500
ANALYTICS_SUMMARY_EVERY = 100


def bound_queue_analytics() -> None:
    """Call before `demo.queue()`. Gradio 6.31's queue keeps a record of the last 10,000 events and, after
    every event, builds a pandas DataFrame of all of them for its monitoring page: CPU per request that
    grows with the requests served, and pandas 3 puts the strings in Arrow's memory pool (mimalloc), which
    kept the high-water marks: +70 MB over 2,000 requests at 32 clients (docs/benchmarks.md, "Under
    load"). Gradio's own settings, `GRADIO_ANALYTICS_MAX_EVENTS` and `GRADIO_ANALYTICS_CACHE_FREQUENCY`,
    bound both; values already in the environment win."""
    os.environ.setdefault("GRADIO_ANALYTICS_MAX_EVENTS", str(ANALYTICS_EVENTS_KEPT))
    os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", str(ANALYTICS_SUMMARY_EVERY))


def write_heatmap(overlay: np.ndarray) -> str:
    """The overlay as a PNG in Gradio's cache, written once and atomically.

    Returning the array would let Gradio 6.31 save it under a content-hash name by rewriting the file in
    place, so a second request for the same image truncates the PNG while a first client downloads it.
    A file already in the cache is served as it is, and swept by `delete_cache` like every upload.
    """
    buffer = io.BytesIO()
    Image.fromarray(overlay).save(buffer, format="PNG", compress_level=1)
    data = buffer.getvalue()
    folder = Path(get_upload_folder()) / hashlib.sha256(data).hexdigest()
    target = folder / "heatmap.png"
    if target.exists():
        os.utime(target)  # the sweep ages files by their times: this one was just served again
        return str(target)
    folder.mkdir(parents=True, exist_ok=True)
    descriptor, staging = tempfile.mkstemp(dir=folder, suffix=".partial")
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    os.replace(staging, target)
    return str(target)


def private_cache(parent: Path | None = None) -> Path:
    """Make a cache folder for this process and point Gradio at it (GRADIO_TEMP_DIR); sweep the folders
    of earlier app processes that no longer run (killed with SIGKILL, the one signal that cannot be
    handled). Call before any Gradio component is built: components keep the folder they were built with.
    """
    parent = Path(parent or tempfile.gettempdir())
    for stale in parent.glob(f"{CACHE_PREFIX}*"):
        if stale.is_dir() and not _process_alive(_pid_of(stale)):
            shutil.rmtree(stale, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(prefix=f"{CACHE_PREFIX}{os.getpid()}-", dir=parent))
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    return folder


def purge_cache(folder: Path) -> None:
    """Delete the cache folder and everything in it (uploads, heatmaps)."""
    if Path(folder).exists():
        shutil.rmtree(folder, ignore_errors=True)
        log.info("deleted the upload cache")


def purge_on_exit(folder: Path) -> None:
    """Delete `folder` however the process stops short of SIGKILL: SIGTERM, SIGINT and SIGHUP become
    KeyboardInterrupt in the main thread (what Gradio's `block_thread` closes the server on), then atexit
    purges. A signal the process was started with ignored stays ignored, as its starter meant: `nohup`
    ignores SIGHUP, and a non-interactive shell starts background jobs with SIGINT ignored. Such an app
    keeps running (and sweeping its cache) through that signal, and SIGTERM still stops it."""
    atexit.register(purge_cache, folder)

    def interrupt(signum: int, _frame: Any) -> None:
        # Supervisors often signal twice (the process and its group): the purge must not be cut short.
        signal.signal(signum, signal.SIG_IGN)
        raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, interrupt)
    for name in ("SIGINT", "SIGHUP"):
        number = getattr(signal, name, None)
        if number is not None and signal.getsignal(number) is not signal.SIG_IGN:
            signal.signal(number, interrupt)


def _pid_of(folder: Path) -> int:
    digits = folder.name.removeprefix(CACHE_PREFIX).split("-", 1)[0]
    return int(digits) if digits.isdigit() else -1


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
