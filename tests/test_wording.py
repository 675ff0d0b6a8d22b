"""One wording (scoring/wording.py): what a person reads about a file, the same on every page and client.

Fast, no Gradio: the sentences themselves, the server page's formatting module importing no Gradio, and the
on-device page's script filling in the server's templates to the very same text (in Node)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from scoring import wording
from scoring.decision import Decision
from serving import ondevice
from tests.helpers import PROJECT

RECORDS = [
    {"name": "a.png", "probability_pneumonia": 0.0004, "label": "NORMAL", "error": None, "triage": "NORMAL",
     "subtype": None, "probability_viral": 0.2, "note": None, "ood_score": None},
    {"name": "b.png", "probability_pneumonia": 0.61234, "label": "PNEUMONIA", "error": None, "triage": "REVIEW",
     "subtype": "VIRAL", "probability_viral": 0.71, "note": "the image was upside down; it was put back upright "
     "before scoring", "ood_score": 1.5},
    {"name": "c.png", "probability_pneumonia": 0.9999, "label": "PNEUMONIA", "error": None, "triage": "PNEUMONIA",
     "subtype": "BACTERIAL", "probability_viral": 0.1, "note": None, "ood_score": None},
]
REFUSALS = ["not a recognised image (expected PNG, JPEG or DICOM)", "file is 57 MB, over the 50 MB limit",
            "not scored: the image is almost uniform", "PNG with 3 frames: upload a single still image",
            "corrupt or truncated image: image file is truncated", Decision.orientation_unclear(), "odd"]


def refused(name: str, error: str) -> dict:
    return {**RECORDS[0], "name": name, "probability_pneumonia": None, "label": None, "error": error,
            "triage": None, "subtype": None, "probability_viral": None}


def test_percent_at_the_ends_follows_the_limits():
    assert [wording.percent(value) for value in (None, 0.0, 0.000999, 0.001, 0.4126, 0.999, 0.9991)] == [
        "", "< 0.1%", "< 0.1%", "0.1%", "41.3%", "99.9%", "> 99.9%"]


def test_sizes_are_in_megabytes_and_never_read_alike():
    assert wording.megabytes(27_345_678) == "27.3 MB" and wording.megabytes(512) == "512 bytes"
    assert wording.too_large(57_000_000, 50_000_000) == "file is 57 MB, over the 50 MB limit"
    assert wording.too_large(50_000_001, 50_000_000) == "file is 50,000,001 bytes, over the 50,000,000-byte limit"
    assert wording.too_large(None, 50_000_000) == "file is over the 50 MB limit"


def test_a_refusal_gets_a_next_step_unless_it_says_what_to_do():
    assert wording.with_next_step(REFUSALS[0]).endswith(f". {wording.CHOOSE_THE_XRAY}")
    assert "Export the X-ray at a smaller size" in wording.with_next_step(REFUSALS[1])
    assert wording.with_next_step(REFUSALS[3]) == REFUSALS[3]  # "upload a single still image" says it
    assert wording.with_next_step(Decision.orientation_unclear()) == Decision.orientation_unclear()
    assert wording.with_next_step("odd", "use the other page") == f"odd. {wording.DEFAULT_NEXT_STEP}, or use the other page"
    assert wording.says_what_to_do(wording.too_many_files(16))


def test_the_decision_in_words():
    normal, review, bacterial = RECORDS
    assert wording.decision_sentence(normal, 0.5) == "NORMAL: probability of pneumonia < 0.1%, threshold 50.0%"
    assert wording.decision_sentence(review, 0.5) == ("PNEUMONIA: probability of pneumonia 61.2%, threshold 50.0%; "
                                                      "triage REVIEW; subtype VIRAL (probability viral 71.0%)")
    assert wording.result_words(review) == "Needs review by a reader (PNEUMONIA at the threshold), likely viral " \
                                           "(71.0% probability viral)"
    assert wording.result_words(bacterial) == "Pneumonia, likely bacterial (10.0% probability viral)"
    assert wording.result_words(refused("x", "odd")) == "Not scored"
    assert wording.scored_line(1, 1) == "Scored 1 of 1 file." and wording.scored_line(0, 3, " here") == "Scored 0 of 3 files here."
    assert wording.no_model("gone\n  away", " on the server") == "no model is loaded on the server: gone away"


def test_the_server_pages_formatting_needs_no_gradio():
    code = "import sys, serving.results, scoring.wording; print(sorted(m for m in sys.modules if m.split('.')[0] in ('gradio', 'fastapi')))"
    loaded = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, capture_output=True, text=True, check=True,
                            timeout=60).stdout.strip()
    assert loaded == "[]"


WORDS_JS = """
const page = await import(pathToFileURL(web + "ondevice.js"));
return {
  refusals: input.refusals.map((error) => page.refusalText(error, input.words)),
  decisions: input.records.map((record) => page.decisionText({...record, threshold: 0.5}, input.words)),
  status: page.statusText(input.batch, null, input.words),
};
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js to run the page's modules")
def test_the_on_device_page_words_a_file_as_the_server_does():
    from tests.test_ondevice import run_js

    decision = Decision(threshold=0.5, threshold_rule="youden", input_size=64)
    words = ondevice.page_words(decision, ondevice.PageSettings())
    batch = [*RECORDS, *(refused(f"r{index}.png", error) for index, error in enumerate(REFUSALS))]
    got = run_js(WORDS_JS, json.loads(json.dumps({"refusals": REFUSALS, "records": RECORDS, "words": words,
                                                  "batch": batch})))
    assert got["refusals"] == [wording.with_next_step(error, ondevice.SERVER_PAGE) for error in REFUSALS]
    assert got["decisions"] == [wording.decision_sentence(record, 0.5) for record in RECORDS]
    assert got["status"] == [wording.scored_line(3, len(batch), ondevice.WHERE)] + [
        wording.REFUSED.format(name=record["name"], reason=wording.with_next_step(record["error"], ondevice.SERVER_PAGE))
        for record in batch[3:]]
