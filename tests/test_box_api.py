"""Box prompts over the wire: raw HTTP to a live server, and our sync and async clients."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import numpy as np
import pytest
from api_fixtures import body, build_api, png_b64
from conftest import HQ_ID, make_picture
from live_server import LiveServer

from segmentation.client import AsyncSegmentationClient, SegmentationAPIError, SegmentationClient
from segmentation.schemas import decode_mask_png

URL = "/v1/images/segmentations"
PICTURE = make_picture(160, 100, seed=21)
# a box alone (empty point list), a point alone, a box with an exclude point
POINTS = [[], [[40, 30]], [[120, 60]]]
LABELS = [[], [1], [0]]
BOXES = [[10, 10, 90, 80], None, [100, 20, 159.5, 99]]


@pytest.fixture(scope="module")
def server():
    app, _ = build_api()
    with LiveServer(app) as live:
        yield live


def _expected(segmenter, n=1):
    return segmenter.segment(segmenter.embed(PICTURE), POINTS, LABELS, BOXES, candidates=n)


def test_box_prompt_over_raw_http_equals_the_engine(server, segmenter):
    payload = body(image_prompt=png_b64(PICTURE), segment_prompt=POINTS, point_labels=LABELS, box_prompt=BOXES, n=2)
    response = httpx.post(server.url + URL, json=payload, timeout=120)
    assert response.status_code == 200, response.text
    answer = response.json()
    expected = _expected(segmenter, n=2)
    for mask, candidate in zip(answer["data"], expected.candidates, strict=True):
        np.testing.assert_array_equal(decode_mask_png(mask["b64_json"]), candidate.labels)
        assert [s["value"] for s in mask["segments"]] == [1, 2, 3]
    # a box costs two prompt tokens: 2 (box) + 1 (point) + 3 (box and point)
    assert answer["usage"]["input_tokens_details"]["point_tokens"] == 6


def test_box_prompt_through_extra_body_as_the_sdk_sends_it(server, segmenter):
    payload = body(image_prompt=png_b64(PICTURE), segment_prompt=POINTS, point_labels=LABELS)
    payload["extra_body"] = {"box_prompt": BOXES}
    response = httpx.post(server.url + URL, json=payload, timeout=120)
    assert response.status_code == 200, response.text
    labels = decode_mask_png(response.json()["data"][0]["b64_json"])
    np.testing.assert_array_equal(labels, _expected(segmenter).best.labels)


@pytest.mark.parametrize(
    "points, boxes, status, message",
    [
        ([[[40, 30]]], [None, None], 400, r"box_prompt must have one box \(or null\) per object"),
        ([[[40, 30]]], [[50, 50, 10, 60]], 400, "object 1: the box .* is inverted or empty"),
        ([[[40, 30]]], [[0, 0, 161, 50]], 400, "outside the 160x100 picture"),
        ([[[40, 30]]], [[0, 0, 10]], 400, r"the box must be \[x0, y0, x1, y1\]"),
        ([[]], [None], 400, "object 1 has neither points nor a box"),
        ([[[40, 30]]], [[0, 0, "a", 10]], 422, r"box_prompt\[0\]"),
        ([[[40, 30]]], "box", 422, "box_prompt"),
    ],
)
def test_bad_boxes_answer_4xx_naming_box_prompt(server, points, boxes, status, message):
    payload = body(image_prompt=png_b64(PICTURE), segment_prompt=points, box_prompt=boxes)
    response = httpx.post(server.url + URL, json=payload, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == "box_prompt"
    assert re.search(message, error["message"]), error["message"]


def test_non_finite_and_huge_box_coordinates_are_refused(server):
    text = json.dumps(body(image_prompt=png_b64(PICTURE), segment_prompt=[[[40, 30]]], box_prompt=[[0, 0, 1, 1]]))
    for bad in ("NaN", "Infinity", "1" + "0" * 400):
        response = httpx.post(
            server.url + URL,
            content=text.replace("[[0, 0, 1, 1]]", f"[[0, 0, {bad}, 1]]"),
            headers={"Content-Type": "application/json"},
            timeout=60,
        )
        assert response.status_code in (400, 422), (bad, response.text)
        error = response.json()["error"]
        assert error["param"] == "box_prompt" and error["message"], (bad, error)


def test_our_clients_take_box_prompt_as_a_keyword(server, segmenter):
    expected = _expected(segmenter).best.labels
    with SegmentationClient(server.url) as client:
        response = client.images.segment(
            image=PICTURE, segment_prompt=POINTS, point_labels=LABELS, box_prompt=BOXES, model=HQ_ID
        )
        np.testing.assert_array_equal(response.data[0].to_array(), expected)
        with pytest.raises(SegmentationAPIError) as info:
            client.images.segment(image=PICTURE, segment_prompt=[[[1, 1]]], box_prompt=[[5, 5, 1, 1]], model=HQ_ID)
        assert info.value.status == 400 and info.value.param == "box_prompt" and "inverted" in info.value.message

    async def run():
        async with AsyncSegmentationClient(server.url) as client:
            return await client.images.segment(
                image=PICTURE, segment_prompt=POINTS, point_labels=LABELS, box_prompt=BOXES, model=HQ_ID
            )

    np.testing.assert_array_equal(asyncio.run(run()).data[0].to_array(), expected)
