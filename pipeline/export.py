"""Export a registered model to a self-contained folder: `python -m pipeline.export DEST [--model-uri URI]`.

The folder holds `model.onnx`, the serving artefact (the network with calibration folded in, and the
decision in its metadata: threshold, model name and version, metrics), and `MODEL_CARD.md`. MLflow stores
artefact paths as absolute paths, so anything meant to travel (a Space, a container, another machine)
needs this folder rather than a registry URI; `app.py --model-uri DEST` and
`python -m pipeline.predict --model-uri DEST` read it. No TensorFlow is needed, here or there.

Exit status: 0 exported; 2 no usable model, or DEST exists and is not an earlier export.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

from scoring.card import card_markdown
from scoring.logs import setup_logging
from scoring.runtime import ServingArtefact
from scoring.store import (
    ARTEFACT_NAME,
    ModelUnavailableError,
    TrackingUnavailableError,
    artefact_path,
    load_artefact,
    model_uri_help,
    production_uri,
)

log = logging.getLogger(__name__)

CARD_FILE = "MODEL_CARD.md"


class ExportError(RuntimeError):
    """The destination cannot be written safely."""


def export(model_uri: str, dest: Path, force: bool = False) -> Path:
    """Write the bundle for `model_uri` to `dest` (written beside it first, then renamed into place)."""
    dest = Path(dest).absolute()
    _check_destination(dest, force)
    load_artefact(model_uri)  # refuses a missing or corrupt artefact with a clear message
    return write_bundle(artefact_path(model_uri).read_bytes(), dest)


def write_bundle(onnx_model: bytes, dest: Path) -> Path:
    """`dest` holding the artefact and its model card, replaced atomically."""
    artefact = ServingArtefact(onnx_model, "export")
    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        (staging / ARTEFACT_NAME).write_bytes(onnx_model)
        (staging / CARD_FILE).write_text(card_markdown(artefact.decision, title=True) + "\n", encoding="utf-8")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if dest.exists():
        shutil.rmtree(dest)  # empty or an earlier export: _check_destination refused anything else
    staging.rename(dest)
    return dest


def _check_destination(dest: Path, force: bool) -> None:
    if not dest.exists():
        return
    if not dest.is_dir():
        raise ExportError(f"{dest} exists and is not a folder")
    if not any(dest.iterdir()):
        return
    if not (dest / ARTEFACT_NAME).is_file():
        raise ExportError(f"{dest} exists and is not an exported model: choose an empty or new folder")
    if not force:
        raise ExportError(f"{dest} already holds an exported model: pass --force to replace it")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("dest", type=Path, help="folder to write (new, empty, or an earlier export with --force)")
    parser.add_argument("--model-uri", default=None, help=model_uri_help())
    parser.add_argument("--force", action="store_true", help="replace an earlier export at DEST")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    uri = args.model_uri or production_uri()
    try:
        dest = export(uri, args.dest, force=args.force)
    except (ModelUnavailableError, TrackingUnavailableError, ExportError) as error:
        log.error("%s", error)
        return 2
    log.info("exported %s to %s", uri, dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
