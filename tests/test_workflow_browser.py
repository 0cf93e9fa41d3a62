"""Labeling a data set in a real headless Chromium: three files picked at once fill the strip, each picture keeps
its objects when the person moves away and back by keyboard, the `?` overlay lists the shortcuts and Escape
closes it, a shortcut typed in the category field stays text, and the session's zip downloads whole with the
visible numbers as its label values."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
from conftest import HQ_ID, make_picture
from live_server import LiveServer
from PIL import Image
from test_browser import HEIGHT, WIDTH, _artifact, click_at, open_page

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def server():
    import app as app_module
    from segmentation.settings import Settings

    with LiveServer(app_module.build_app(Settings(model=HQ_ID, preload_examples=False, device="cpu"))) as live:
        yield live


def _idle(page) -> None:
    page.wait_for_function("!window.samhq.queue.length && !window.samhq.busy")


def _view(page) -> dict:
    return page.evaluate("window.samhq.view")


def test_three_pictures_strip_keyboard_overlay_and_session_zip(browser, server, tmp_path):
    paths = []
    for seed in range(3):
        path = tmp_path / f"shot-{seed}.png"
        Image.fromarray(make_picture(WIDTH, HEIGHT, seed=20 + seed)).save(path)
        paths.append(str(path))
    page, errors = open_page(browser, server)
    page.locator("#file").set_input_files(paths)
    page.wait_for_function("document.querySelectorAll('#strip .strip-item').length === 3")
    page.get_by_text("Picture ready").wait_for()
    _idle(page)
    assert page.locator("#strip .strip-item.current").get_attribute("data-index") == "0"
    assert page.locator("#picture-count").inner_text() == "Picture 1 of 3"

    # picture 1: two objects, then the first deleted: Object 2 remains, named by keyboard-free typing
    click_at(page, 40, 40)
    page.keyboard.press("n")
    click_at(page, 120, 90)
    _idle(page)
    page.locator("#active-object").select_option("1")
    page.keyboard.press("Delete")
    _idle(page)
    assert [o["number"] for o in _view(page)["objects"]] == [2]
    page.locator("#object-category").fill("cat z")  # "z" typed in the field is text, not Undo
    page.locator("#object-category").press("Enter")
    _idle(page)
    assert _view(page)["objects"][0]["category"] == "cat z"
    assert len(_view(page)["objects"][0]["points"]) == 1
    page.wait_for_function("document.querySelector('#strip .strip-item[data-index=\"0\"]').dataset.objects === '1'")

    # next picture by keyboard: no objects there; one point; back by keyboard: picture 1's objects as left
    page.locator("#stage").focus()
    page.keyboard.press("ArrowRight")
    page.wait_for_function("window.samhq.album.current === 1 && !window.samhq.queue.length && !window.samhq.busy")
    assert not any(o["points"] for o in _view(page)["objects"])
    assert page.locator("#strip .strip-item.current").get_attribute("data-index") == "1"
    click_at(page, 60, 60)
    _idle(page)
    page.keyboard.press("ArrowLeft")
    page.wait_for_function("window.samhq.album.current === 0 && !window.samhq.queue.length && !window.samhq.busy")
    view = _view(page)
    assert [(o["number"], o["category"]) for o in view["objects"]] == [(2, "cat z")] and view["map"]
    page.keyboard.press("z")  # undo works on the history kept with the picture
    _idle(page)
    assert _view(page)["objects"][0]["points"] == []
    page.keyboard.press("y")
    _idle(page)
    assert len(_view(page)["objects"][0]["points"]) == 1

    # the shortcuts overlay
    assert page.locator("#shortcuts").is_hidden()
    page.keyboard.press("?")
    assert page.locator("#shortcuts").is_visible()
    assert "Next picture" in page.locator("#shortcuts").inner_text()
    page.keyboard.press("Escape")
    assert page.locator("#shortcuts").is_hidden()

    # the whole session as one zip, downloaded by the browser
    with page.expect_download() as download_info:
        page.locator("#export-session").click()
    download = download_info.value
    assert download.suggested_filename == "dataset.zip"
    target = tmp_path / "dataset.zip"
    download.save_as(target)
    with zipfile.ZipFile(target) as archive:
        names = archive.namelist()
        assert {"masks/shot-0.png", "masks/shot-1.png", "masks/shot-2.png", "data.yaml"} <= set(names), names
        values = set(np.unique(np.asarray(Image.open(io.BytesIO(archive.read("masks/shot-0.png"))))).tolist())
        coco = json.loads(archive.read("annotations/instances_rle.json"))
    assert values == {0, 2}, values  # Object 1 deleted: Object 2 is value 2
    assert {c["name"] for c in coco["categories"]} >= {"cat z"}
    page.screenshot(path=str(_artifact("browser-workflow.png")), full_page=True)
    assert not errors, errors
    page.close()
