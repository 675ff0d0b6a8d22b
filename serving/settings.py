"""The app's command line and environment settings: a light module (argparse and the scoring core's limits,
no Gradio, no MLflow), so that `python app.py` reads them before importing Gradio."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from scoring.pixels import MAX_FILE_BYTES
from scoring.store import ARTEFACT_NAME, model_uri_help
from scoring.wording import megabytes

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
# Files per request, for every page and route of the app (the server page, the REST route, the on-device page).
MAX_FILES = 16


def default_model_uri(shipped_model_dir: Path) -> str | None:
    """An exported model shipped beside the app (a Hugging Face Space has no MLflow store), else None:
    the registry's production alias."""
    return str(shipped_model_dir) if (shipped_model_dir / ARTEFACT_NAME).is_file() else None


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def parse_args(argv: list[str], shipped_model_dir: Path, description: str = "") -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python app.py", description=description)
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", DEFAULT_HOST),
                        help="interface to listen on (env GRADIO_SERVER_NAME; default %(default)s)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", DEFAULT_PORT)),
                        help="port (env GRADIO_SERVER_PORT; default %(default)s)")
    parser.add_argument("--share", action="store_true", default=env_flag("GRADIO_SHARE"),
                        help="also ask for a public gradio.live link (env GRADIO_SHARE)")
    parser.add_argument("--model-uri",
                        default=os.environ.get("PNEUMONIA_MODEL_URI") or default_model_uri(shipped_model_dir),
                        help=model_uri_help("env PNEUMONIA_MODEL_URI, else a `model/` export beside app.py, as "
                                            "on a Space, else the production alias"))
    parser.add_argument("--max-file-mb", type=float,
                        default=float(os.environ.get("PNEUMONIA_MAX_FILE_MB", MAX_FILE_BYTES / 1e6)),
                        help="largest file accepted, in MB: at most the decoder's own limit, the default "
                             "(env PNEUMONIA_MAX_FILE_MB; default %(default)s)")
    settings = parser.parse_args(argv)
    if not 0 < settings.max_file_mb * 1e6 <= MAX_FILE_BYTES:
        parser.error(f"--max-file-mb must be above 0 and at most {megabytes(MAX_FILE_BYTES)}, the decoder's limit")
    return settings
