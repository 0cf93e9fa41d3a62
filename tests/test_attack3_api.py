"""attack3: a knob of segment_everything written as a JSON integer past a float's range is a 500 with a
traceback in the log (`float(raw)` raises OverflowError in everything_options.parse_everything)."""

from __future__ import annotations

import httpx
import pytest
from api_fixtures import build_api, png_b64
from conftest import HQ_ID
from live_server import LiveServer


@pytest.mark.parametrize("knob", ["min_mask_region_area", "points_per_side", "box_nms_thresh"])
def test_a_huge_integer_knob_is_a_named_400(knob):
    app, _ = build_api()
    digits = "1" + "0" * 400
    raw = f'{{"model": "{HQ_ID}", "image_prompt": "{png_b64()}", "segment_everything": {{"{knob}": {digits}}}}}'
    with LiveServer(app) as server:
        answer = httpx.post(
            server.url + "/v1/images/segmentations",
            content=raw,
            headers={"content-type": "application/json"},
            timeout=60,
        )
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == f"segment_everything.{knob}"
    assert len(answer.json()["error"]["message"]) < 300  # the number is not echoed whole
