"""The HTTP API: the SDK's wire contract, our extra parameters, usage, models, auth."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from api_fixtures import body, build_api, png_b64
from conftest import HQ_ID, SAM_ID, make_picture
from fastapi.testclient import TestClient
from PIL import Image

from segmentation.schemas import SegmentationResponse

URL = "/v1/images/segmentations"


@pytest.fixture(scope="module")
def api():
    app, registry = build_api()
    with TestClient(app) as client:
        client.registry = registry
        yield client


def test_response_matches_the_sdk_contract(api):
    response = api.post(URL, json=body())
    assert response.status_code == 200, response.text
    payload = response.json()
    assert set(payload) == {"created", "data", "usage"}
    assert isinstance(payload["created"], int)
    mask = payload["data"][0]
    assert {"b64_json", "label", "score"} <= set(mask)
    assert isinstance(mask["b64_json"], str) and mask["label"] is None and isinstance(mask["score"], float)
    usage = payload["usage"]
    assert set(usage) == {"input_tokens", "input_tokens_details", "output_tokens", "total_tokens"}
    assert all(isinstance(v, int) for v in usage["input_tokens_details"].values())
    assert set(usage["input_tokens_details"]) == {"image_tokens", "cached_tokens", "point_tokens"}
    assert usage["input_tokens"] == 64 * 64 + 3
    assert usage["output_tokens"] == 1 and usage["total_tokens"] == usage["input_tokens"] + 1


def test_mask_png_is_the_engine_label_map_at_the_picture_size(api, segmenter):
    picture = make_picture(160, 100, seed=7)
    prompt = [[[40, 30]], [[120, 60], [130, 70]]]
    response = SegmentationResponse.model_validate(
        api.post(URL, json=body(image_prompt=png_b64(picture), segment_prompt=prompt)).json()
    )
    labels = response.data[0].to_array()
    assert labels.shape == (100, 160) and labels.dtype == np.uint8
    expected = segmenter.segment(segmenter.embed(picture), prompt)
    np.testing.assert_array_equal(labels, expected.best.labels)
    segments = response.data[0].segments
    assert [s.value for s in segments] == [1, 2]
    assert [s.area for s in segments] == [o.area for o in expected.best.objects]
    assert response.data[0].score == pytest.approx(expected.best.score)


def test_second_identical_request_reports_cached_image_tokens(api):
    picture = png_b64(make_picture(160, 100, seed=41))
    first = api.post(URL, json=body(image_prompt=picture)).json()["usage"]["input_tokens_details"]
    second = api.post(URL, json=body(image_prompt=picture)).json()["usage"]["input_tokens_details"]
    assert first["cached_tokens"] == 0
    assert second["cached_tokens"] == second["image_tokens"] == 4096


def test_n_size_labels_hq_token_only_and_data_url(api):
    data_url = "data:image/png;base64," + png_b64()
    response = api.post(
        URL,
        json=body(
            image_prompt=data_url,
            n=3,
            size="64x48",
            point_labels=[[1], [1, 0]],
            hq_token_only=True,
            user="tester-1",
            timeout=5,
            unknown_field={"ignored": True},
        ),
    )
    assert response.status_code == 200, response.text
    masks = SegmentationResponse.model_validate(response.json()).data
    assert len(masks) == 3
    for mask in masks:
        labels = mask.to_array()
        assert labels.shape == (48, 64)
        assert set(np.unique(labels)) <= {0, 1, 2}
        assert [s.area for s in mask.segments] == [int((labels == k).sum()) for k in (1, 2)]


def test_base64_with_line_breaks_and_spaces_reads_as_the_same_picture(api):
    """MIME-style base64 (a line break every 76 characters, as `base64.encodebytes` writes) and stray spaces
    are accepted, as before the strict first try was added; text that is not base64 stays a named 400."""
    picture = base64.b64decode(png_b64(make_picture(160, 100, seed=43)))
    plain = api.post(URL, json=body(image_prompt=base64.b64encode(picture).decode()))
    wrapped = api.post(URL, json=body(image_prompt=" " + base64.encodebytes(picture).decode().replace("A", "A ", 3)))
    assert plain.status_code == wrapped.status_code == 200, wrapped.text
    assert plain.json()["data"][0]["b64_json"] == wrapped.json()["data"][0]["b64_json"]
    broken = api.post(URL, json=body(image_prompt=base64.encodebytes(picture).decode() + "*"))
    assert broken.status_code == 400
    assert broken.json()["error"]["code"] == "invalid_base64"


def test_extra_body_carries_parameters(api):
    response = api.post(URL, json=body(extra_body={"n": 2, "size": "32x20"}))
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert len(data) == 2 and data[0]["segments"]
    assert Image.open(io.BytesIO(base64.b64decode(data[0]["b64_json"]))).size == (32, 20)


def test_second_served_model(api):
    response = api.post(URL, json=body(model=SAM_ID))
    assert response.status_code == 200, response.text


def test_models_endpoint_lists_the_served_models(api):
    payload = api.get("/v1/models").json()
    assert payload["object"] == "list"
    assert [card["id"] for card in payload["data"]] == [HQ_ID, SAM_ID]
    assert all(card["object"] == "model" and isinstance(card["created"], int) for card in payload["data"])


def test_validate_answers_the_sdk(api):
    payload = api.post("/authentication/validate").json()
    assert set(payload) == {"message", "organization_id"}


def test_openapi_describes_the_schemas(api):
    schema = api.get("/openapi.json").json()
    operation = schema["paths"]["/v1/images/segmentations"]["post"]
    assert "SegmentationRequest" in str(operation["requestBody"])
    assert "SegmentationResponse" in str(operation["responses"]["200"])
    assert "ErrorResponse" in str(operation["responses"]["400"])
    components = schema["components"]["schemas"]
    assert {"Mask", "Usage", "Segment", "InputTokensDetails", "ErrorDetail"} <= set(components)


def test_auth_required_when_keys_are_configured():
    app, _ = build_api(api_keys=("secret-one", "secret-two"))
    with TestClient(app) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic secret-one"}):
            response = client.post(URL, json=body(), headers=headers)
            assert response.status_code == 401
            assert response.json()["error"]["type"] == "authentication_error"
            assert client.get("/v1/models", headers=headers).status_code == 401
            assert client.post("/authentication/validate", headers=headers).status_code == 401
        ok = {"Authorization": "Bearer secret-two"}
        assert client.post(URL, json=body(), headers=ok).status_code == 200
        assert client.post("/authentication/validate", headers=ok).json()["organization_id"]


def test_open_api_says_so_at_start_up(caplog):
    with caplog.at_level("WARNING"):
        build_api()
    assert any("API is open" in record.message for record in caplog.records)
    with caplog.at_level("INFO"):
        build_api(api_keys=("k-123456",))
    assert all("k-123456" not in record.getMessage() for record in caplog.records)
