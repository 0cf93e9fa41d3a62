"""The vendor SDK, unmodified, against our live server: `AIRefinery(...).images.segment` sync and async.

airefinery-sdk needs Python >= 3.12; it is installed in a venv of its own (the project's may be
older). Skipped, with the reason, where no such interpreter exists or the install fails.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from api_fixtures import build_api, png_b64
from conftest import HQ_ID, make_picture
from live_server import LiveServer

from segmentation.schemas import Mask

SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys
    from air import AIRefinery, AsyncAIRefinery
    from air.types import SegmentationResponse

    base_url, key, image, model = sys.argv[1:5]
    prompt = [[[40, 30]], [[120, 60], [130, 70]]]
    sync = AIRefinery(api_key=key, base_url=base_url).images.segment(
        image=image, segment_prompt=prompt, model=model, n=2, point_labels=[[1], [1, 0]], user="sdk-test"
    )
    assert isinstance(sync, SegmentationResponse)
    box = AIRefinery(api_key=key, base_url=base_url).images.segment(
        image=image, segment_prompt=[[], [[40, 30]]], model=model, extra_body={"box_prompt": [[10, 10, 90, 80], None]}
    )

    async def run():
        client = AsyncAIRefinery(api_key=key, base_url=base_url)
        return await client.images.segment(image=image, segment_prompt=prompt, model=model, size="80x50")

    async_result = asyncio.run(run())
    assert isinstance(async_result, SegmentationResponse)
    print(json.dumps({"sync": sync.model_dump(), "async": async_result.model_dump(), "box": box.model_dump()}))
    """
)


@pytest.mark.slow
def test_vendor_sdk_sync_and_async_against_our_server(sdk_python, segmenter):
    app, _ = build_api(api_keys=("sdk-key",))
    with LiveServer(app) as server:
        result = subprocess.run(
            [sdk_python, "-c", SCRIPT, server.url, "sdk-key", png_b64(make_picture(160, 100)), HQ_ID],
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(payload["sync"]["data"]) == 2
    assert payload["sync"]["usage"]["input_tokens_details"]["point_tokens"] == 3
    assert Mask(**payload["sync"]["data"][0]).to_array().shape == (100, 160)
    labels = Mask(**payload["async"]["data"][0]).to_array()
    assert labels.shape == (50, 80) and set(np.unique(labels)) <= {0, 1, 2}
    assert payload["box"]["usage"]["input_tokens_details"]["point_tokens"] == 3  # a box is two tokens
    expected = segmenter.segment(
        segmenter.embed(make_picture(160, 100)), [[], [[40, 30]]], None, [[10, 10, 90, 80], None]
    )
    np.testing.assert_array_equal(Mask(**payload["box"]["data"][0]).to_array(), expected.best.labels)
    assert sys.version_info >= (3, 10)
