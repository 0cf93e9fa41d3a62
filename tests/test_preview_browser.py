"""Issue 19 part 2 in real Chromium (Debian's /usr/bin/chromium via Playwright): with the preview toggled on,
the pointer resting on the picture draws #preview without any click request reaching the server; a click there
then gets the server's mask, which agrees with the preview; toggled off, nothing is drawn.

The agreement threshold: the preview runs the same graph on the same features rounded to float16 and upscales
as the server does, so the two masks differ only where a logit is within float16's rounding of 0 (the tiny
checkpoint measured IoU ≥ 0.9998 in benchmarks/preview_bench.py). 0.97 leaves room for a boundary pixel row
on this small picture and still fails for any real fault (a shifted point, a wrong candidate, a mis-scaled
upscale all measured below 0.9 there).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import HQ_ID, make_picture
from live_server import LiveServer
from PIL import Image

WIDTH, HEIGHT = 320, 200
AGREEMENT = 0.97

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import app as app_module
    from segmentation.settings import Settings

    with pytest.MonkeyPatch.context() as env:
        env.setenv("SAMHQ_UI_SESSIONS_DIR", str(tmp_path_factory.mktemp("sessions")))
        application = app_module.build_app(Settings(model=HQ_ID, preload_examples=False, device="cpu"))
    with LiveServer(application) as live:
        yield live


def test_hover_draws_the_preview_and_the_click_agrees(browser, server, tmp_path):
    path = Path(tmp_path) / "picture.png"
    Image.fromarray(make_picture(WIDTH, HEIGHT, seed=2)).save(path)
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.set_default_timeout(240_000)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    edits: list[str] = []
    page.on("request", lambda request: edits.append(request.post_data or "") if request.url.endswith("/op") else None)
    page.goto(server.url)
    page.wait_for_selector("#samhq[data-ready='1']")
    toggle = page.locator("#preview-toggle")
    assert toggle.is_visible() and not toggle.is_checked()  # off by default (docs/PERFORMANCE.md says why)
    assert page.locator("#preview-state").text_content() == "off"
    page.locator("#file").set_input_files(str(path))
    page.get_by_text("Picture ready").wait_for()
    toggle.check()
    page.wait_for_function("window.samhq.previewState.state === 'ready'")
    assert page.locator("#preview-state").text_content() == "on"

    box = page.locator("#points").bounding_box()
    x, y = round(box["x"] + box["width"] * 0.3), round(box["y"] + box["height"] * 0.4)  # whole pixels, as a mouse
    clicks_before = sum('"click"' in body for body in edits)
    page.mouse.move(x - 5, y - 5)
    page.mouse.move(x, y)
    page.wait_for_function("Number(document.querySelector('#preview').dataset.drawn) > 0")
    assert sum('"click"' in body for body in edits) == clicks_before  # drawn in the browser: no click was sent
    drawn = page.evaluate("window.previewBeforeClick = window.samhq.previewState.last; window.previewBeforeClick.area")
    assert drawn > 0

    page.mouse.click(x, y)
    page.wait_for_function(
        "Number(document.querySelector('#overlay').dataset.clicks) >= 1 && !window.samhq.queue.length"
    )
    agreement = page.evaluate(
        """() => {
          const S = window.samhq, last = window.previewBeforeClick;
          const active = S.view.objects.find((o) => o.number === S.view.active);
          if (S.labels.width !== last.width || S.labels.height !== last.height) return null;
          let both = 0, either = 0;
          for (let i = 0; i < last.mask.length; i++) {
            const a = last.mask[i] === 1, b = S.labels.data[i] === active.value;
            both += a && b; either += a || b;
          }
          return { iou: both / Math.max(1, either), point: active.points[0], hovered: [last.x, last.y] };
        }"""
    )
    assert agreement is not None and agreement["point"] == agreement["hovered"], agreement
    assert agreement["iou"] >= AGREEMENT, agreement
    assert page.evaluate("document.querySelector('#preview').dataset.drawn") == "0"  # the click's answer replaced it

    toggle.uncheck()
    assert page.locator("#preview-state").text_content() == "off"
    runs = page.evaluate("window.samhq.previewState.seq")
    page.mouse.move(x + 20, y + 10)
    page.mouse.move(x + 25, y + 12)
    # the moves were handled (Playwright returns once they are): off, the pointer is not even followed
    assert page.evaluate("window.samhq.previewState.pointer") is None
    assert page.evaluate("window.samhq.previewState.seq") == runs
    assert page.evaluate("document.querySelector('#preview').dataset.drawn") == "0"
    assert not errors, errors
    page.close()
