"""A person at the page: headless Debian Chromium driven by Playwright draws a 7 with the mouse,
presses Recognise and reads the prediction. The screenshot is kept in artifacts/. The browser:
tests/browser.py (`make test` installs one; without one this skips, naming the command, and fails under CI)."""
import contextlib
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from tests import browser

pytestmark = [pytest.mark.ray, pytest.mark.slow]

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
SCREENSHOT = Path(__file__).resolve().parents[1] / "artifacts" / "ui-browser.png"
FAILURE_SHOT = SCREENSHOT.with_name("ui-browser-failure.png")


@pytest.fixture(scope="session")  # session, as serve_app: set up first, so a skip starts no cluster
def chromium() -> str:
    return browser.require()


@pytest.fixture(scope="module")
def page(chromium, serve_app):
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=chromium, args=FLAGS)
        page = instance.new_page(viewport={"width": 1200, "height": 900})
        page.goto(serve_app.ui_url, wait_until="networkidle")
        yield page
        instance.close()


@contextlib.contextmanager
def screenshot_on_failure(page):
    try:
        yield
    except Exception:
        SCREENSHOT.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(FAILURE_SHOT), full_page=True)
        raise


def draw(page, strokes: list[list[tuple[float, float]]]) -> None:
    """Mouse strokes in coordinates relative to the canvas centre (pixels)."""
    box = page.locator("#sketchpad canvas").first.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    for stroke in strokes:
        page.mouse.move(cx + stroke[0][0], cy + stroke[0][1])
        page.mouse.down()
        for x, y in stroke[1:]:
            page.mouse.move(cx + x, cy + y, steps=20)
        page.mouse.up()


def test_draw_a_seven_and_read_the_prediction(page, serve_app):
    with screenshot_on_failure(page):
        expect(page.locator("#version")).to_contain_text(serve_app.model()["model_version"], timeout=30_000)
        draw(page, [[(-60, -100), (60, -100), (-20, 110)]])  # the bar, then the stem
        page.click("#submit")
        top = page.locator('#prediction [data-testid="label-output-value"]')
        expect(top).to_have_text("7", timeout=30_000)
        expect(page.locator("#seen img")).to_be_visible()
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)


def test_clear_empties_the_page(page):
    with screenshot_on_failure(page):
        page.click("#clear")
        expect(page.locator('#prediction [data-testid="label-output-value"]')).to_have_count(0, timeout=10_000)


def test_an_example_is_recognised(page):
    with screenshot_on_failure(page):
        page.locator(".gallery-item").nth(1).click()  # the examples: 7, 2, 1, 0
        expect(page.locator('#prediction [data-testid="label-output-value"]')).to_have_text("2", timeout=30_000)
