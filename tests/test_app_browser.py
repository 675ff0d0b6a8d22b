"""The server page in a real browser (Debian's Chromium through Playwright), as issue #21 asked: a phone's
width, a file over the size limit beside a scored one, choosing a row, the API page's example, visible focus
and worded button names. Skipped only where /usr/bin/chromium is absent."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest

from tests import image_factory as factory
from tests.helpers import BROWSER_TEST_MARKS, EXAMPLES, PROJECT, launched, write

TIMEOUT_MS = 60_000  # generous: two busy cores
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 1400}
MAX_FILE_BYTES = 100_000  # small, so an over-limit file is quick to make

pytestmark = BROWSER_TEST_MARKS


@pytest.fixture(scope="module")
def app_url(app_module, service) -> Iterator[str]:
    demo = app_module.create_demo(service=service, max_file_bytes=MAX_FILE_BYTES)
    try:
        yield launched(demo, **app_module.launch_options(demo, MAX_FILE_BYTES))
    finally:
        demo.close()


def open_page(browser, url: str, viewport: dict):
    context = browser.new_context(viewport=viewport)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.get_by_text("Not a medical device.").first.wait_for()
    return context, page


@pytest.fixture
def phone(browser, app_url):
    context, page = open_page(browser, app_url, PHONE)
    yield page
    context.close()


@pytest.fixture
def desktop(browser, app_url):
    context, page = open_page(browser, app_url, DESKTOP)
    yield page
    context.close()


def upload(page, *paths) -> None:
    page.locator("#upload input[type=file]").set_input_files([str(path) for path in paths])
    page.locator("#status").get_by_text(re.compile(r"Scored \d+ of")).wait_for()


def cell(page, row: int, column: int):
    """A cell of the table's body as drawn (Gradio 6 draws rows as ARIA grid cells, beside hidden copies)."""
    return page.locator(f'#results [role=gridcell][data-row="{row}"][data-col="{column}"]').first


def test_phone_shows_every_files_decision_and_brings_the_result_into_view(phone, tmp_path):
    notes = write(tmp_path, "notes.txt", b"not an X-ray")
    upload(phone, EXAMPLES[0], EXAMPLES[-1], notes)
    for row in range(3):
        for column in range(4):  # file, result, probability, note: all within the screen's width
            box = cell(phone, row, column).bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"] + 1, box
    assert cell(phone, 2, 1).inner_text() == "Not scored" and cell(phone, 0, 2).inner_text().endswith("%")
    # No row is cut off by the table's own scroll box.
    last, table = cell(phone, 2, 3).bounding_box(), phone.locator("#results").bounding_box()
    assert last["y"] + last["height"] <= table["y"] + table["height"]
    # Nothing scrolls sideways: not the table, not the page.
    assert phone.evaluate("() => document.documentElement.scrollWidth") <= PHONE["width"]
    # The result was scrolled into view after scoring.
    box = phone.locator("#result-label").bounding_box()
    assert box is not None and box["y"] < PHONE["height"] and box["y"] + box["height"] > 0


def test_file_over_the_limit_gets_its_own_row_beside_a_scored_file(desktop, tmp_path):
    from playwright.sync_api import expect

    noise = np.random.default_rng(1).integers(0, 256, (400, 400), dtype=np.uint8)
    big = write(tmp_path, "big.png", factory.png(noise))
    upload(desktop, big, EXAMPLES[0])
    expect(desktop.locator("#status")).to_contain_text("Scored 1 of 2 files")
    table = desktop.locator("#results")
    expect(table).to_contain_text(re.compile(r"file is 0\.1\d* MB, over the 0\.1 MB limit"))
    expect(table).to_contain_text(EXAMPLES[0].name)
    expect(desktop.locator("#result-label")).to_contain_text(EXAMPLES[0].name)
    assert desktop.get_by_text("exceed the maximum allowed size").count() == 0  # no Gradio toast


def test_choosing_a_row_shows_that_files_result_and_map(desktop):
    from playwright.sync_api import expect

    upload(desktop, EXAMPLES[0], EXAMPLES[-1])
    result = desktop.locator("#result-label")
    expect(result).to_contain_text(EXAMPLES[0].name)
    first_map = desktop.locator("#heatmap img").first.get_attribute("src")
    cell(desktop, 1, 0).click()
    expect(result).to_contain_text(EXAMPLES[-1].name)
    expect(result).not_to_contain_text(EXAMPLES[0].name)
    expect(desktop.locator("#heatmap img").first).not_to_have_attribute("src", first_map or "")


def test_api_page_example_sends_an_example_file_and_runs_offline(desktop, app_url, tmp_path):
    from playwright.sync_api import expect

    desktop.get_by_text("Use via API").first.click()
    expect(desktop.locator("body")).to_contain_text(f"paths=handle_file('examples/{EXAMPLES[0].name}')")
    text = desktop.locator("body").inner_text()
    start = text.index("from gradio_client import Client, handle_file")
    code = text[start:text.index("print(result)", start)]
    assert 'api_name="/predict"' in code and "sample_file.pdf" not in text
    for name in ("Result of the selected file", "Structured result (JSON)", "probability_pneumonia"):
        assert name in text, name
    # The snippet, run as it stands from the project folder, scores the example.
    script = write(tmp_path, "snippet.py", (code + "\nprint(result)\n").encode())
    ran = subprocess.run([sys.executable, script], cwd=PROJECT, capture_output=True, text=True, timeout=120,
                         check=False)
    assert ran.returncode == 0, ran.stderr
    assert "probability of pneumonia" in ran.stdout and EXAMPLES[0].name in ran.stdout


def test_focus_is_visible_and_buttons_are_named_in_words(desktop):
    upload(desktop, EXAMPLES[0])
    button = desktop.get_by_role("button", name="Screen again", exact=True)
    button.focus()
    desktop.keyboard.press("Shift+Tab")
    desktop.keyboard.press("Tab")  # focus by keyboard: :focus-visible applies
    outline = button.evaluate("(el) => [getComputedStyle(el).outlineStyle, getComputedStyle(el).outlineWidth]")
    assert outline[0] == "solid" and float(outline[1].removesuffix("px")) >= 3
    names = desktop.evaluate("() => [...document.querySelectorAll('[aria-label], [title]')]"
                             ".map((el) => el.getAttribute('aria-label') || el.getAttribute('title'))")
    assert not [name for name in names if name.startswith("common.")], names


def test_page_without_a_model_says_why(browser, app_module, tmp_path):
    """(Moved from test_browser.py: the button is now "Screen again".)"""
    from playwright.sync_api import expect

    demo = app_module.create_demo(service=app_module.ModelService(str(tmp_path / "not-exported")))
    context = browser.new_context()
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(launched(demo))
        expect(page.locator("#no-model")).to_contain_text("No model is loaded", timeout=TIMEOUT_MS)
        expect(page.locator("#model-card")).to_contain_text("make repro", timeout=TIMEOUT_MS)
        expect(page.get_by_role("button", name="Screen again", exact=True)).to_be_disabled(timeout=TIMEOUT_MS)
    finally:
        context.close()
        demo.close()
