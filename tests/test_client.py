"""Our sync and async clients against a live local server."""

from __future__ import annotations

import asyncio
import base64
import io

import numpy as np
import pytest
from api_fixtures import build_api
from conftest import HQ_ID, make_picture
from live_server import LiveServer
from PIL import Image

from segmentation.client import AsyncSegmentationClient, SegmentationAPIError, SegmentationClient, encode_image
from segmentation.schemas import SegmentationResponse

PROMPT = [[[40, 30]], [[120, 60], [130, 70]]]


@pytest.fixture(scope="module")
def server():
    app, _ = build_api(api_keys=("client-key",))
    with LiveServer(app) as live:
        yield live


@pytest.fixture(scope="module")
def picture() -> np.ndarray:
    return make_picture(160, 100, seed=12)


def _sources(picture, tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    data = buffer.getvalue()
    path = tmp_path / "picture.png"
    path.write_bytes(data)
    return {
        "base64": base64.b64encode(data).decode(),
        "path": str(path),
        "pathlib": path,
        "bytes": data,
        "pil": Image.fromarray(picture),
        "array": picture,
    }


def test_sync_client_accepts_every_image_kind_and_decodes_masks(server, picture, segmenter, tmp_path):
    expected = segmenter.segment(segmenter.embed(picture), PROMPT).best.labels
    with SegmentationClient(server.url, api_key="client-key") as client:
        assert client.models() == [HQ_ID, "facebook/sam-vit-base"]
        for name, source in _sources(picture, tmp_path).items():
            response = client.images.segment(image=source, segment_prompt=PROMPT, model=HQ_ID)
            assert isinstance(response, SegmentationResponse)
            np.testing.assert_array_equal(response.data[0].to_array(), expected, err_msg=name)


def test_sync_client_passes_kwargs_extra_body_and_headers(server, picture):
    with SegmentationClient(server.url, api_key="client-key") as client:
        response = client.images.segment(
            image=picture,
            segment_prompt=PROMPT,
            model=HQ_ID,
            point_labels=[[1], [1, 0]],
            n=2,
            extra_body={"size": "40x25"},
            extra_headers={"X-Request-Id": "abc"},
            timeout=30,
            user="someone",
        )
    assert len(response.data) == 2
    assert response.data[1].to_array().shape == (25, 40)
    assert response.usage.output_tokens == 2


def test_client_errors_carry_status_and_message(server, picture):
    with SegmentationClient(server.url, api_key="client-key") as client:
        with pytest.raises(SegmentationAPIError) as info:
            client.images.segment(image=picture, segment_prompt=[[[999, 1]]], model=HQ_ID)
        assert info.value.status == 400 and "outside" in info.value.message and info.value.param == "segment_prompt"
        with pytest.raises(SegmentationAPIError) as info:
            client.images.segment(image=picture, segment_prompt=PROMPT, model="nope/nope")
        assert info.value.status == 404
    with SegmentationClient(server.url, api_key="wrong") as client:
        with pytest.raises(SegmentationAPIError) as info:
            client.images.segment(image=picture, segment_prompt=PROMPT, model=HQ_ID)
        assert info.value.status == 401


def test_async_client_concurrent_requests(server, picture):
    async def run():
        async with AsyncSegmentationClient(server.url, api_key="client-key") as client:
            assert HQ_ID in await client.models()
            calls = [
                client.images.segment(image=picture, segment_prompt=[[[10 + 20 * i, 20]]], model=HQ_ID)
                for i in range(4)
            ]
            responses = await asyncio.gather(*calls)
            with pytest.raises(SegmentationAPIError) as info:
                await client.images.segment(image=picture, segment_prompt=[], model=HQ_ID)
            assert info.value.status == 400
            return responses

    responses = asyncio.run(run())
    assert all(r.data[0].to_array().shape == (100, 160) for r in responses)


def test_encode_image_rejects_other_types():
    with pytest.raises(TypeError, match="base64 text, a path"):
        encode_image(3.5)


def test_a_non_json_error_page_still_raises_with_its_status():
    import httpx

    from segmentation.client import _parse

    with pytest.raises(SegmentationAPIError) as info:
        _parse(httpx.Response(502, text="<html>Bad gateway</html>"))
    assert info.value.status == 502 and "Bad gateway" in info.value.message
