"""Segment everything through the HTTP API: raw HTTP, our client, the vendor SDK (extra_body), and bad knobs."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import textwrap

import httpx
import numpy as np
import pytest
from api_fixtures import build_api, png_b64
from conftest import HQ_ID, make_picture
from live_server import LiveServer
from official_amg import OfficialAutomaticMaskGenerator
from official_reference import OfficialPredictor
from PIL import Image

from segmentation.client import SegmentationAPIError, SegmentationClient
from segmentation.everything import generate
from segmentation.everything_options import EverythingOptions
from segmentation.schemas import Mask
from segmentation.service import everything_result

KNOBS = {
    "points_per_side": 5,
    "points_per_batch": 7,
    "pred_iou_thresh": 0.0,
    "stability_score_thresh": 0.05,
    "box_nms_thresh": 1.0,  # random weights: every box is about the whole picture
}
ROUTE = "/v1/images/segmentations"


@pytest.fixture(scope="module")
def server():
    app, _ = build_api()
    with LiveServer(app) as live:
        yield live


@pytest.fixture(scope="module")
def picture() -> np.ndarray:
    return make_picture(160, 100, seed=5)


@pytest.fixture(scope="module")
def expected(segmenter, picture):
    embedding = segmenter.embed(picture)
    found = generate(segmenter, embedding, EverythingOptions(**KNOBS))
    assert len(found.masks) >= 2, "the comparison needs a few objects"
    return found, everything_result(segmenter, embedding, True, found, None, {})


def _check(payload: dict, expected) -> None:
    found, result = expected
    assert len(payload["data"]) == 1
    mask = payload["data"][0]
    np.testing.assert_array_equal(Mask(**mask).to_array(), result.candidates[0].labels)
    assert [s["value"] for s in mask["segments"]] == list(range(1, len(found.masks) + 1))
    scores = [s["score"] for s in mask["segments"]]
    assert scores == pytest.approx([m.score for m in found.masks], rel=1e-5) and scores == sorted(scores, reverse=True)
    for segment, obj in zip(mask["segments"], result.candidates[0].objects):
        assert segment["area"] == obj.area and segment["bbox"] == (list(obj.bbox) if obj.bbox else None)
    assert payload["usage"]["input_tokens_details"]["point_tokens"] == KNOBS["points_per_side"] ** 2


def test_raw_http_top_level_and_in_extra_body(server, picture, expected):
    image = png_b64(picture)
    with httpx.Client(base_url=server.url, timeout=120) as http:
        top = http.post(ROUTE, json={"model": HQ_ID, "image_prompt": image, "segment_everything": KNOBS})
        assert top.status_code == 200, top.text
        _check(top.json(), expected)
        nested = http.post(
            ROUTE,
            json={
                "model": HQ_ID,
                "image_prompt": image,
                "segment_prompt": [],
                "extra_body": {"segment_everything": KNOBS},
            },
        )
        assert nested.status_code == 200, nested.text
        _check(nested.json(), expected)
        assert nested.json()["usage"]["input_tokens_details"]["cached_tokens"] > 0  # no second encode
        small = http.post(
            ROUTE, json={"model": HQ_ID, "image_prompt": image, "segment_everything": KNOBS, "size": "80x50"}
        )
        assert Mask(**small.json()["data"][0]).to_array().shape == (50, 80)


def test_our_client(server, picture, expected):
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    with SegmentationClient(server.url) as client:
        response = client.images.segment_everything(image=buffer.getvalue(), model=HQ_ID, **KNOBS)
        _check(response.model_dump(), expected)
        with pytest.raises(SegmentationAPIError) as caught:
            client.images.segment_everything(image=buffer.getvalue(), model=HQ_ID, points_per_side=0)
    assert caught.value.status == 400 and caught.value.param == "segment_everything.points_per_side"


def test_min_mask_region_area_cleans_the_label_map(server, segmenter, picture):
    """The clean-up through raw HTTP and our client, against the independent port of official (OpenCV): every
    labelled pixel lies in its object's cleaned mask (a removed island is never the object's), and every pixel
    of a cleaned mask is labelled (a filled hole is the object's unless another object's mask holds it)."""
    knobs = KNOBS | {"min_mask_region_area": 20}
    image = png_b64(picture)
    with httpx.Client(base_url=server.url, timeout=120) as http:
        answers = [http.post(ROUTE, json={"model": HQ_ID, "image_prompt": image, "segment_everything": k}) for k in
                   (knobs, KNOBS)]  # fmt: skip
    assert all(answer.status_code == 200 for answer in answers), answers[0].text
    cleaned, plain = (answer.json()["data"][0] for answer in answers)
    labels, plain_labels = Mask(**cleaned).to_array(), Mask(**plain).to_array()
    reference = OfficialPredictor(segmenter.model, segmenter.loaded.processor)
    official = OfficialAutomaticMaskGenerator(reference, **knobs).generate(picture)
    assert [s["point"] for s in cleaned["segments"]] == [ref["point_coords"][0] for ref in official]
    assert any(ref["changed"] for ref in official)
    plain_value = {tuple(s["point"]): s["value"] for s in plain["segments"]}
    islands = holes = 0
    for segment, ref in zip(cleaned["segments"], official):
        own, mask = labels == segment["value"], ref["segmentation"]
        assert not (own & ~mask).any()  # never outside its cleaned mask
        assert (labels[mask] != 0).all()  # each of its pixels is its own or another object's
        assert segment["area"] == int(own.sum())  # measured on the map
        before = plain_labels == plain_value[tuple(segment["point"])]
        islands += int((before & ~mask).sum())  # its pixels before, in islands removed since
        holes += int((own & (plain_labels == 0)).sum())  # nobody's before, its own now: filled holes
    assert islands > 0 and holes > 0
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    with SegmentationClient(server.url) as client:  # our client passes the knob through
        response = client.images.segment_everything(image=buffer.getvalue(), model=HQ_ID, **knobs)
    np.testing.assert_array_equal(Mask(**response.model_dump()["data"][0]).to_array(), labels)


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"segment_everything": {"points_per_side": 100}}, "segment_everything.points_per_side"),
        ({"segment_everything": {"box_nms_thresh": 2}}, "segment_everything.box_nms_thresh"),
        ({"segment_everything": {"pred_iou": 0.5}}, "segment_everything"),
        ({"segment_everything": {"min_mask_region_area": -1}}, "segment_everything.min_mask_region_area"),
        ({"segment_everything": {"min_mask_region_area": 0.5}}, "segment_everything.min_mask_region_area"),
        ({"segment_everything": {"min_mask_region_area": 10**9}}, "segment_everything.min_mask_region_area"),
        # JSON integers past a float's range: the range's 400 (was an OverflowError, a 500), the number not echoed
        ({"segment_everything": {"min_mask_region_area": 10**400}}, "segment_everything.min_mask_region_area"),
        ({"segment_everything": {"points_per_side": 10**400}}, "segment_everything.points_per_side"),
        ({"segment_everything": {"box_nms_thresh": 10**400}}, "segment_everything.box_nms_thresh"),
        ({"segment_everything": "all"}, "segment_everything"),
        ({"segment_everything": True, "segment_prompt": [[[10, 10]]]}, "segment_prompt"),
        ({"segment_everything": True, "n": 3}, "n"),
    ],
)
def test_bad_requests_are_named_4xx(server, extra, param):
    body = {"model": HQ_ID, "image_prompt": png_b64(make_picture(40, 30))} | extra
    response = httpx.post(server.url + ROUTE, json=body, timeout=60)
    assert 400 <= response.status_code < 500, response.text
    error = response.json()["error"]
    assert error["param"] == param and 0 < len(error["message"]) < 300


def test_the_work_limit_counts_grid_points():
    app, _ = build_api(max_work_mp=1)
    image = png_b64(make_picture(160, 100))  # 0.016 megapixels: 8×8 = 64 points is 1.02 point-megapixels
    with LiveServer(app) as live:
        refused = httpx.post(
            live.url + ROUTE,
            json={"model": HQ_ID, "image_prompt": image, "segment_everything": {"points_per_side": 8}},
            timeout=60,
        )
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "too_much_work"
        assert "points_per_side" in refused.json()["error"]["message"]
        allowed = httpx.post(
            live.url + ROUTE,
            json={"model": HQ_ID, "image_prompt": image, "segment_everything": {"points_per_side": 7}},
            timeout=120,
        )
        assert allowed.status_code == 200, allowed.text


SDK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from air import AIRefinery
    base_url, image, model, knobs = sys.argv[1:5]
    response = AIRefinery(api_key="k", base_url=base_url).images.segment(
        image=image, segment_prompt=[], model=model, extra_body={"segment_everything": json.loads(knobs)}
    )
    print(json.dumps(response.model_dump()))
    """
)


@pytest.mark.slow
def test_vendor_sdk_through_extra_body(sdk_python, server, picture, expected):
    result = subprocess.run(
        [sdk_python, "-c", SDK_SCRIPT, server.url, png_b64(picture), HQ_ID, json.dumps(KNOBS)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    mask = payload["data"][0]
    np.testing.assert_array_equal(
        np.asarray(Image.open(io.BytesIO(base64.b64decode(mask["b64_json"])))), expected[1].candidates[0].labels
    )
