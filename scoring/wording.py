"""What a person reads about a file, worded once for every client.

The server page (`serving.results`), `POST /api/v1/predict` (`serving.rest`), the predict CLI, Spark
(`pipeline.batch`), the model card (`scoring.card`) and the on-device page say sizes, percentages, a refusal
and what to do next, the decision, the status line and "no model is loaded" with the texts of this module.
The on-device page gets them from the server's config (`serving.ondevice.page_words`) and never retypes them.
No Gradio and nothing heavy: the scoring core's decoder (`scoring.imaging`) words its size limit from here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from scoring.decision import REVIEW

# Probabilities are shown in percent with one decimal, below the floor as "< 0.1%" and above the ceiling as
# "> 99.9%"; JSON, CSV and Parquet keep the fractions.
PERCENT_FLOOR, PERCENT_CEILING = 0.001, 0.999

# A refusal that names one of these verbs already says what to do, and is shown as it is.
ACTION_WORDS = ("send", "export", "upload", "use", "choose", "convert", "reload")
CHOOSE_THE_XRAY = "Choose the chest X-ray itself (PNG, JPEG or DICOM, as the X-ray system exports it)"
# What to do about a refusal that does not say it (the first fragment found in the lowercased message wins).
NEXT_STEPS = (
    ("not a recognised image", CHOOSE_THE_XRAY),
    ("corrupt", "Export or download the file again"),
    ("empty file", "Export or download the file again"),
    ("too small", "Send the X-ray at its original resolution"),
    ("megapixel", "Export the X-ray at a smaller resolution"),
    ("over the size limit", "Export the X-ray at a smaller resolution"),
    ("mb limit", "Export the X-ray at a smaller size (PNG or JPEG at its original resolution is usually a few MB)"),
    ("byte limit", "Export the X-ray at a smaller size (PNG or JPEG at its original resolution is usually a few MB)"),
    ("strongly coloured", "Send the greyscale X-ray itself, not a photograph or a screenshot of it"),
    ("elongated", "Send the whole X-ray, not a crop or a strip"),
    ("uniform", "Check that the file holds the X-ray image"),
    ("cannot be read", "Upload the file again"),
)
DEFAULT_NEXT_STEP = "Check the file, and send a frontal chest X-ray as PNG, JPEG or DICOM"

NOT_SCORED = "not scored"
REVIEW_WORDS = "Needs review by a reader"
# One line per file: the decision, and beside it the triage when it differs and the kind of pneumonia.
DECISION = "{label}: probability of pneumonia {probability}, threshold {threshold}"
TRIAGE_PART = "; triage {triage}"
SUBTYPE_PART = "; subtype {subtype} (probability viral {probability_viral})"
REVIEW_LINE = "The probability is in the uncertain band: a reader should review this X-ray."
# The status line of a request, then one line per file not scored.
SCORED = "Scored {scored} of {total} {files}{where}."
REFUSED = "{name}: {reason}"
NO_MODEL = "no model is loaded"
NO_MODEL_REMEDY = "Train and register one with `make repro`, then restart the app."
# Files Spark lists but does not read (or reads as nothing), which the predict path never sees.
UNREADABLE = "the file could not be read: not scored"
EMPTY_OR_GONE = "the file is empty (or vanished while the job ran): not scored"


def percent(probability: float | None) -> str:
    """A probability as every page shows it: `41.3%`, `< 0.1%` and `> 99.9%` at the ends, "" for none."""
    if probability is None:
        return ""
    if probability < PERCENT_FLOOR:
        return f"< {PERCENT_FLOOR:.1%}"
    if probability > PERCENT_CEILING:
        return f"> {PERCENT_CEILING:.1%}"
    return f"{probability:.1%}"


def megabytes(size: int) -> str:
    """A size as every message gives it (MB, 10^6 bytes): `50 MB`, `27.3 MB`, `0.003 MB`; under a kB in bytes
    (`512 bytes`), never in powers of ten."""
    return f"{size:,} bytes" if size < 1000 else f"{size / 1e6:.3g} MB"


def too_large(size: int | None, limit: int) -> str:
    """A file over the size limit: `file is 57 MB, over the 50 MB limit` (in bytes where both sizes would
    round alike), or without its size (a stream cut off at the limit) `file is over the 50 MB limit`."""
    if size is None:
        return f"file is over the {megabytes(limit)} limit"
    actual, cap = megabytes(size), megabytes(limit)
    if actual == cap:  # just over the limit: rounded, both would read the same ("50 MB, over the 50 MB")
        actual, cap = f"{size:,} bytes", f"{limit:,}-byte"
    return f"file is {actual}, over the {cap} limit"


def too_many_files(limit: int) -> str:
    """The refusal of each file past the `limit` of one request or batch."""
    return f"{NOT_SCORED}: at most {limit} files at a time. Choose the rest again, in another batch"


def says_what_to_do(error: str) -> bool:
    return re.search(rf"\b({'|'.join(ACTION_WORDS)})\b", error, re.IGNORECASE) is not None


def next_step(error: str) -> str:
    lowered = error.lower()
    return next((step for fragment, step in NEXT_STEPS if fragment in lowered), DEFAULT_NEXT_STEP)


def with_next_step(error: str, alternative: str | None = None) -> str:
    """A refusal with what to do about it (one that already says is kept as it is); `alternative`, another
    way out a page offers (the on-device page: the server page), follows the step."""
    if says_what_to_do(error):
        return error
    return f"{error}. {next_step(error)}" + (f", or {alternative}" if alternative else "")


def result_words(record: Mapping[str, Any]) -> str:
    """A prediction record's decision in words: `Pneumonia, likely viral (71.0% probability viral)`,
    `Needs review by a reader (NORMAL at the threshold)`, `Not scored`."""
    label = record["label"]
    if record["probability_pneumonia"] is None:
        return NOT_SCORED.capitalize()
    triage = record["triage"] or label
    words = (REVIEW_WORDS + f" ({label} at the threshold)") if triage == REVIEW else triage.capitalize()
    if record["subtype"]:
        words += f", likely {record['subtype'].lower()} ({percent(record['probability_viral'])} probability viral)"
    return words


def decision_sentence(record: Mapping[str, Any], threshold: float) -> str:
    """`PNEUMONIA: probability of pneumonia 61.2%, threshold 50.0%; triage REVIEW; subtype VIRAL (probability
    viral 71.0%)`: the triage only where it differs from the label."""
    text = DECISION.format(label=record["label"], probability=percent(record["probability_pneumonia"]),
                           threshold=percent(threshold))
    if record["triage"] and record["triage"] != record["label"]:
        text += TRIAGE_PART.format(triage=record["triage"])
    if record["subtype"]:
        text += SUBTYPE_PART.format(subtype=record["subtype"], probability_viral=percent(record["probability_viral"]))
    return text


def note(record: Mapping[str, Any], alternative: str | None = None) -> str:
    """Why a file was not scored and what to do (`with_next_step`), and how it was put upright."""
    parts = [with_next_step(record["error"], alternative)] if record["error"] else []
    return "; ".join(parts + ([record["note"]] if record["note"] else []))


def scored_line(scored: int, total: int, where: str = "") -> str:
    return SCORED.format(scored=scored, total=total, files="file" if total == 1 else "files", where=where)


def no_model(problem: str | None, where: str = "") -> str:
    """One line: no model to score with (`where`: " on the server", for the on-device page), and why."""
    return f"{NO_MODEL}{where}: {' '.join(str(problem or 'unknown cause').split())}"
