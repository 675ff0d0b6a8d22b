"""The app in a real browser: Debian's Chromium driven by Playwright uploads an X-ray and waits for the
result and the class-activation map, then clicks an example. Skipped only where /usr/bin/chromium is absent."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers import BROWSER_TEST_MARKS, EXAMPLES, launched

TIMEOUT_MS = 60_000  # generous: two busy cores

pytestmark = BROWSER_TEST_MARKS


@pytest.fixture(scope="module")
def app_url(app_module, service) -> Iterator[str]:
    demo = app_module.create_demo(service=service)
    try:
        yield launched(demo)
    finally:
        demo.close()




@pytest.fixture
def page(browser, app_url):
    context = browser.new_context(viewport={"width": 1280, "height": 1400})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(app_url)
    page.get_by_text("Not a medical device.").first.wait_for()
    yield page
    context.close()


def wait_for_result(page) -> None:
    page.locator("#result-label").get_by_text("probability of pneumonia").first.wait_for()
    page.locator("#heatmap img").first.wait_for(state="visible")


def test_upload_shows_label_heatmap_and_model_card(page, tmp_path):
    page.locator("#upload input[type=file]").set_input_files(str(EXAMPLES[0]))
    wait_for_result(page)
    assert page.locator("#status").get_by_text("Scored 1 of 1 file").is_visible()
    # The model panel, filled on page load, shows the artefact's card.
    card = page.locator("#model-card")
    assert card.get_by_text("tiny-test-model version 7").is_visible()
    assert card.get_by_text("ROC-AUC").first.is_visible()
    shot = tmp_path / "app.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.is_file() and shot.stat().st_size > 20_000


def test_example_runs_in_one_click(page):
    page.get_by_text("Pneumonia (viral)").first.click()
    wait_for_result(page)
    from playwright.sync_api import expect

    # The table also renders hidden copies of its cells (to measure them): look at its text instead.
    expect(page.locator("#results")).to_contain_text(EXAMPLES[-1].name, timeout=TIMEOUT_MS)


def test_non_image_upload_shows_our_message(page, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an X-ray")
    page.locator("#upload input[type=file]").set_input_files(str(notes))
    page.locator("#status").get_by_text("not a recognised image").first.wait_for()


def test_details_json_names_the_model_and_the_file(page):
    from playwright.sync_api import expect

    page.locator("#upload input[type=file]").set_input_files(str(EXAMPLES[0]))
    wait_for_result(page)
    page.get_by_text("Result as JSON (what the API returns)").click()
    details = page.locator("#details")
    for shown in ("tiny-test-model", EXAMPLES[0].name, "threshold"):
        expect(details).to_contain_text(shown, timeout=TIMEOUT_MS)


# test_page_without_a_model_says_why moved to tests/test_app_browser.py (the button is now "Screen again").
