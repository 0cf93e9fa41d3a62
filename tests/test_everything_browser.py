"""The Everything button in a real headless Chromium: the progress bar moves as batches finish, Cancel stops a
run, and a found object is an ordinary object that a click refines."""

from __future__ import annotations

import json

import pytest
from conftest import HQ_ID, make_picture
from live_server import LiveServer
from PIL import Image
from test_browser import HEIGHT, WIDTH, _artifact, click_at, open_page, upload

pytestmark = pytest.mark.browser

# random weights: official's thresholds keep nothing, and every box is about the whole picture
LOW = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.05, "box_nms_thresh": 1.0, "points_per_batch": 8}


@pytest.fixture(scope="module")
def server():
    import app as app_module
    from segmentation.settings import Settings

    with LiveServer(app_module.build_app(Settings(model=HQ_ID, preload_examples=False, device="cpu"))) as live:
        yield live


def test_everything_button_progress_cancel_and_a_found_object_refined(browser, server, tmp_path):
    path = tmp_path / "picture.png"
    Image.fromarray(make_picture(WIDTH, HEIGHT, seed=2)).save(path)
    page, errors = open_page(browser, server)
    upload(page, path)
    page.evaluate(f"document.querySelector('#everything').dataset.options = {json.dumps(json.dumps(LOW))}")
    # Cancel: a 32×32 run (128 batches) stops after the current batch
    page.locator("#everything-grid").select_option("32")
    page.locator("#everything").click()
    page.wait_for_function("Number(document.querySelector('#everything-progress').dataset.done) >= 1")
    assert page.locator("#everything-progress").is_visible() and page.locator("#everything").is_disabled()
    page.locator("#everything-cancel").click()
    page.wait_for_function("document.querySelector('#everything-tools').dataset.state === 'cancelled'")
    assert int(page.locator("#everything-progress").get_attribute("data-done")) < 128
    assert page.locator("#everything-cancel").is_hidden() and page.locator("#everything").is_enabled()
    # a whole run: the bar moves batch by batch (8×8 grid, 8 batches), then the objects appear
    page.locator("#everything-grid").select_option("8")
    page.evaluate(
        """() => { window.samhqDone = []; const bar = document.querySelector('#everything-progress');
        new MutationObserver(() => window.samhqDone.push(Number(bar.dataset.done)))
            .observe(bar, { attributes: true, attributeFilter: ['data-done'] }); }"""
    )
    page.locator("#everything").click()
    page.wait_for_function("document.querySelector('#everything-tools').dataset.state === 'applied'")
    seen = sorted(set(page.evaluate("window.samhqDone")))
    assert len([d for d in seen if 0 < d < 8]) >= 2, f"the bar should move as batches finish, saw {seen}"
    found = int(page.locator("#everything-tools").get_attribute("data-found"))
    assert found >= 2
    assert page.locator("#legend").inner_text().count("Object") >= found
    options = page.locator("#active-object option").all_inner_texts()
    assert options[0] == "Object 2" and len(options) == found  # the empty Object 1 made way
    # the active found object (Object 2) refined by an exclude click; numbers stay
    page.locator("input[name=samhq-mode][value=exclude]").check()
    click_at(page, 10, 10)
    page.wait_for_function(
        "window.samhq.view.objects[0].points.length === 2 && !window.samhq.queue.length && !window.samhq.busy"
    )
    view = page.evaluate("window.samhq.view")
    assert view["objects"][0]["labels"] == [1, 0] and view["objects"][0]["number"] == 2
    assert [o["number"] for o in view["objects"]] == list(range(2, 2 + found))
    page.screenshot(path=str(_artifact("browser-everything.png")), full_page=True)
    assert not errors, errors
    page.close()
