"""End to end in a real headless Chromium: upload, click two objects, see the overlay, download the mask.

Uses Debian's /usr/bin/chromium driven by Playwright (never a downloaded browser build).
A screenshot is kept under artifacts/ as an artifact of the run.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import HQ_ID, make_picture
from live_server import LiveServer
from PIL import Image

CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser():
    playwright_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Debian's chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server():
    import app as app_module
    from segmentation.settings import Settings

    settings = Settings(model=HQ_ID, preload_examples=False, device="cpu")
    with LiveServer(app_module.build_app(settings)) as live:
        yield live


def _click_on_picture(page, x: float, y: float, width: int, height: int) -> None:
    image = page.locator("#canvas img").first
    box = image.bounding_box()
    # the picture is letterboxed inside its box: map picture pixels to screen pixels
    scale = min(box["width"] / width, box["height"] / height)
    left = box["x"] + (box["width"] - width * scale) / 2
    top = box["y"] + (box["height"] - height * scale) / 2
    page.mouse.click(left + (x + 0.5) * scale, top + (y + 0.5) * scale)


def test_upload_click_two_objects_and_download_the_mask(browser, server, tmp_path):
    width, height = 320, 200
    picture_path = tmp_path / "picture.png"
    Image.fromarray(make_picture(width, height, seed=2)).save(picture_path)
    ARTIFACTS.mkdir(exist_ok=True)

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(server.url)
    page.locator("#canvas input[type=file]").set_input_files(str(picture_path))
    page.get_by_text("ready — embedding").wait_for()

    _click_on_picture(page, 96, 80, width, height)
    page.get_by_text("1 object(s)").wait_for()
    page.locator("#new-object").click()
    page.wait_for_function("document.querySelector('#active-object input').value === 'Object 2'")
    _click_on_picture(page, 224, 120, width, height)
    page.get_by_text("2 object(s)").wait_for()
    page.locator("#overlay img").wait_for(state="visible")
    page.locator("#legend").get_by_text("Object 2").wait_for()
    page.screenshot(path=str(ARTIFACTS / "browser-two-objects.png"), full_page=True)

    page.get_by_text("Export").click()
    page.locator("#export").click()
    link = page.locator("#mask-file a").first
    link.wait_for()
    href = link.get_attribute("href")
    data = page.request.get(href if href.startswith("http") else server.url + href).body()
    mask = np.asarray(Image.open(io.BytesIO(data)))
    assert mask.shape == (height, width)
    assert set(np.unique(mask)) <= {0, 1, 2}
    assert {1, 2} <= set(np.unique(mask)), "both objects should have pixels"
    assert not errors, errors
    page.close()


def test_an_example_picture_loads_with_one_click_and_segments(browser, server):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    page.goto(server.url)
    page.locator("#examples img").nth(1).click()  # chelsea.jpg, 451×300
    page.get_by_text("Picture 451×300 ready").wait_for()
    _click_on_picture(page, 225, 150, 451, 300)
    page.get_by_text("1 object(s)").wait_for()
    page.locator("#candidates img").nth(2).wait_for()  # a single point: three candidates
    page.locator("#legend").get_by_text("1 of 3").wait_for()
    page.locator("#candidates button.thumbnail-item").nth(1).click()
    page.locator("#legend").get_by_text("2 of 3").wait_for()
    page.wait_for_function("!document.querySelector('#overlay .pending, #legend .pending')")
    page.screenshot(path=str(ARTIFACTS / "browser-example.png"), full_page=True)
    page.close()
