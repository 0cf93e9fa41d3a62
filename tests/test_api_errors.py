"""Every malformed request gets a 4xx JSON error naming the problem, and the server keeps serving."""

from __future__ import annotations

import base64
import io
import json

import httpx
import pytest
from api_fixtures import body, build_api, png_b64
from conftest import HQ_ID, make_picture
from fastapi import FastAPI
from fastapi.testclient import TestClient
from live_server import LiveServer
from PIL import Image

from segmentation.api import install_api
from segmentation.service import ModelRegistry
from segmentation.settings import Settings

URL = "/v1/images/segmentations"


@pytest.fixture(scope="module")
def api():
    app, _ = build_api()
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def _bomb_b64() -> str:
    buffer = io.BytesIO()
    Image.new("1", (30000, 30000)).save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode()


def _large_b64() -> str:
    """10000×10000: over our 40 MP limit but under Pillow's own bomb guard, so our check answers."""
    buffer = io.BytesIO()
    Image.new("1", (10000, 10000)).save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode()


def _truncated_b64() -> str:
    buffer = io.BytesIO()
    Image.fromarray(make_picture(200, 150)).save(buffer, format="JPEG")
    return base64.b64encode(buffer.getvalue()[:1500]).decode()


CASES = [
    # (name, body (dict) or raw text, status, substring of the message, param)
    ("not json", "{not json", 400, "not valid JSON", None),
    ("json but not an object", "[1, 2, 3]", 400, "JSON object", None),
    (
        "missing image",
        {"model": "m", "segment_prompt": [[[1, 1]]]},
        422,
        "Missing required field 'image_prompt'",
        "image_prompt",
    ),
    (
        "missing prompt",
        {"model": "m", "image_prompt": "aGk="},
        422,
        "Missing required field 'segment_prompt'",
        "segment_prompt",
    ),
    ("missing model", {"image_prompt": "aGk=", "segment_prompt": [[[1, 1]]]}, 422, "'model'", "model"),
    ("not base64", body(image_prompt="***not base64***"), 400, "not valid base64", "image_prompt"),
    ("empty image", body(image_prompt=""), 400, "empty", "image_prompt"),
    (
        "not a picture",
        body(image_prompt=base64.b64encode(b"hello world, not a picture").decode()),
        400,
        "not a picture",
        "image_prompt",
    ),
    ("truncated picture", body(image_prompt=_truncated_b64()), 400, "truncated", "image_prompt"),
    ("decompression bomb", body(image_prompt=_bomb_b64()), 413, "megapixel limit", "image_prompt"),
    ("over the pixel limit", body(image_prompt=_large_b64()), 413, "100.0 megapixels; the limit is 40", "image_prompt"),
    ("prompt depth 2", body(segment_prompt=[[1, 2]]), 422, "segment_prompt[0][0]", "segment_prompt"),
    ("prompt depth 4", body(segment_prompt=[[[[1, 2]]]]), 422, "segment_prompt[0][0][0]", "segment_prompt"),
    ("empty prompt", body(segment_prompt=[]), 400, "no objects", "segment_prompt"),
    ("empty object", body(segment_prompt=[[[1, 1]], []]), 400, "object 2 has no points", "segment_prompt"),
    (
        "three coordinates",
        body(segment_prompt=[[[1, 2, 3]]]),
        400,
        "object 1, point 1 must be [x, y], got 3 values",
        "segment_prompt",
    ),
    ("string coordinates", body(segment_prompt=[[["1", 2]]]), 422, "segment_prompt[0][0][0]", "segment_prompt"),
    (
        "nan",
        json.dumps(body(segment_prompt=[[[1, 2]]])).replace("[[[1, 2]]]", "[[[NaN, 2]]]"),
        422,
        "finite",
        "segment_prompt",
    ),
    ("infinity", json.dumps(body()).replace("[[[40, 30]]", "[[[Infinity, 30]]"), 422, "finite", "segment_prompt"),
    ("outside", body(segment_prompt=[[[160, 10]]]), 400, "outside the 160x100 picture", "segment_prompt"),
    ("negative", body(segment_prompt=[[[-1, 10]]]), 400, "outside", "segment_prompt"),
    ("labels shape", body(point_labels=[[1]]), 400, "one list per object", "point_labels"),
    (
        "labels inner shape",
        body(point_labels=[[1], [1]]),
        400,
        "object 2 has 2 points but point_labels gives 1",
        "point_labels",
    ),
    ("label value", body(point_labels=[[2], [1, 0]]), 400, "label must be 1 (include) or 0 (exclude)", "point_labels"),
    ("label -1", body(point_labels=[[-1], [1, 0]]), 400, "use 0", "point_labels"),
    ("n zero", body(n=0), 400, "n must be from 1 to 3", "n"),
    ("n four", body(n=4), 400, "n must be from 1 to 3", "n"),
    ("n string", body(n="2"), 422, "n:", "n"),
    ("bad size", body(size="big"), 400, "WIDTHxHEIGHT", "size"),
    ("size zero", body(size="0x10"), 400, "out of range", "size"),
    ("unknown model", body(model="someone/else"), 404, "not served here", "model"),
    ("too many objects", body(segment_prompt=[[[1, 1]]] * 256), 400, "256 objects; the limit is 255", "segment_prompt"),
    ("too many points", body(segment_prompt=[[[1, 1]] * 65]), 400, "65 points; the limit is 64", "segment_prompt"),
    ("extra_body not an object", body(extra_body=[1]), 422, "extra_body", "extra_body"),
]


@pytest.mark.parametrize("name, payload, status, message, param", CASES, ids=[case[0] for case in CASES])
def test_error_matrix(api, name, payload, status, message, param):
    if isinstance(payload, str):
        response = api.post(URL, content=payload, headers={"Content-Type": "application/json"})
    else:
        response = api.post(URL, json=payload)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert message in error["message"]
    assert error["param"] == param
    assert "Traceback" not in response.text
    # and the server keeps serving
    assert api.post(URL, json=body()).status_code == 200


def test_unknown_route_under_the_api_is_a_json_404(api):
    response = api.get("/v1/nothing-here")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_body_over_the_limit_is_refused_by_content_length_and_while_streaming():
    app, _ = build_api(max_body_mb=1)
    big = b"x" * (2 * 2**20)
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        response = client.post(URL, content=big, headers={"Content-Type": "application/json"})
        assert response.status_code == 413 and "1 MiB limit" in response.json()["error"]["message"]
        sent = {"bytes": 0}

        def chunks():  # no Content-Length: chunked transfer
            for _ in range(64):
                sent["bytes"] += 64 * 1024
                yield b"x" * (64 * 1024)

        response = client.post(URL, content=chunks(), headers={"Content-Type": "application/json"})
        assert response.status_code == 413
        assert client.post(URL, json=body()).status_code == 200


def test_pictures_of_every_kind_are_served(api):
    picture = make_picture(160, 100)
    kinds = {}
    for mode, fmt in [("RGBA", "PNG"), ("L", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"), ("RGB", "WEBP")]:
        buffer = io.BytesIO()
        Image.fromarray(picture).convert(mode).save(buffer, format=fmt)
        kinds[f"{mode}-{fmt}"] = base64.b64encode(buffer.getvalue()).decode()
    buffer = io.BytesIO()
    Image.fromarray((make_picture(160, 100)[..., 0].astype("uint16") * 257), "I;16").save(buffer, format="PNG")
    kinds["16-bit"] = base64.b64encode(buffer.getvalue()).decode()
    rotated = Image.fromarray(picture).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    rotated.save(buffer, format="JPEG", exif=exif.tobytes())
    kinds["exif-rotated"] = base64.b64encode(buffer.getvalue()).decode()
    for name, image in kinds.items():
        response = api.post(URL, json=body(image_prompt=image, segment_prompt=[[[150.5, 90.25]]]))
        assert response.status_code == 200, (name, response.text)
        png = base64.b64decode(response.json()["data"][0]["b64_json"])
        assert Image.open(io.BytesIO(png)).size == (160, 100), name


def test_png_b64_helper_round_trips():
    assert Image.open(io.BytesIO(base64.b64decode(png_b64()))).size == (160, 100)


def test_an_unexpected_server_bug_is_a_json_500_without_a_traceback():
    def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    settings = Settings(model=HQ_ID, preload_examples=False, device="cpu")
    app = FastAPI()
    install_api(app, ModelRegistry(settings), settings, segment=broken)
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post(URL, json=body())
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error"
    assert "secret internal detail" not in response.text and "Traceback" not in response.text
