"""Score image files and folders with a registered model: `python -m pipeline.predict PATH... [--model-uri
URI] [--output CSV]`. Writes path, probability of pneumonia, label at the model's registered threshold and
error, then triage (NORMAL, PNEUMONIA or REVIEW), subtype (BACTERIAL or VIRAL for a PNEUMONIA), probability
that it is viral, a note when the X-ray was put back upright before scoring, and the input gate's score:
the prediction record (`scoring.runtime.RECORD_FIELDS`) every client gives, with the same error texts.

It runs the serving artefact (`scoring.runtime`, no TensorFlow), so it accepts, refuses and labels files
exactly as the app and the MLflow model do. Exit status: 0 all files scored; 1 some files could not be
read or were refused (their rows carry the error, the rest are scored); 2 no usable model or no input files.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from pathlib import Path
from typing import TextIO

from scoring.logs import setup_logging
from scoring.pixels import DICOM_MAGIC_OFFSET, IMAGE_SUFFIXES, is_dicom
from scoring.runtime import RECORD_FIELDS, Predictor
from scoring.store import (
    ModelUnavailableError,
    TrackingUnavailableError,
    brief,
    load_artefact,
    model_uri_help,
    production_uri,
)

log = logging.getLogger(__name__)

# The first four are the contract models are evaluated by from outside; new columns only ever go after them.
COLUMNS = ["path", *RECORD_FIELDS]


def expand_paths(arguments: list[str]) -> list[Path]:
    """Files as given, plus the image files found (recursively, sorted) inside any folders given: by
    extension, or by the DICOM marker for files without one (scanners often write none)."""
    paths = []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _looks_like_image(p))
            skipped = sum(1 for p in path.rglob("*") if p.is_file()) - len(found)
            if skipped:
                log.info("%d files in %r are not images by name or content: skipped", skipped, str(path))
            paths += found
        else:
            paths.append(path)
    return paths


def _looks_like_image(path: Path) -> bool:
    if path.suffix.lower().lstrip(".") in IMAGE_SUFFIXES:
        return True
    if path.suffix or path.name.startswith("."):
        return False
    try:
        with path.open("rb") as handle:
            return is_dicom(handle.read(DICOM_MAGIC_OFFSET + 4))
    except OSError:
        return False


def write_csv(predictions: list, handle: TextIO) -> None:
    writer = csv.writer(handle)
    writer.writerow(COLUMNS)
    for prediction in predictions:
        writer.writerow([prediction.name, *(_cell(value) for value in prediction.record().values())])


def _cell(value: float | str | None) -> str:
    if value is None:
        return ""
    return f"{value:.6f}" if isinstance(value, float) else value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="image files (PNG, JPEG, DICOM) or folders of them")
    parser.add_argument("--model-uri", default=None, help=model_uri_help())
    parser.add_argument("--output", type=Path, default=None, help="CSV file to write (default: stdout)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    paths = expand_paths(args.paths)
    if not paths:
        log.error("no image files found in %s", " ".join(args.paths))
        return 2
    uri = args.model_uri or production_uri()
    try:
        predictor = Predictor(load_artefact(uri))
    except (ModelUnavailableError, TrackingUnavailableError) as error:
        log.error("%s", brief(error, limit=2000))  # one line: the cause, not a traceback
        return 2
    predictions = predictor.predict_paths(paths)
    failed = [p for p in predictions if p.error]
    for prediction in failed:
        log.warning("not scored %r: %s", prediction.name, prediction.error)  # %r: names may hold newlines
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        with args.output.open("w", newline="", encoding="utf-8") as handle:
            write_csv(predictions, handle)
    else:
        write_csv(predictions, sys.stdout)
    decision = predictor.decision
    log.info("scored %d of %d files with %s version %s (threshold %.4f)", len(predictions) - len(failed),
             len(predictions), decision.model_name, decision.model_version, predictor.threshold)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
