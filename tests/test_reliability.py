"""The server under load and faults: no crosstalk, flat memory, 429 when full, 503 and recovery, disconnects.

Bounded in count and time; loopback only.
"""

from __future__ import annotations

import base64
import gc
import io
import resource
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from api_fixtures import png_b64
from conftest import HQ_ID, make_picture
from fastapi import FastAPI
from live_server import LiveServer

from segmentation import ModelUnavailableError, Segmenter
from segmentation import decoder as dec
from segmentation.api import install_api
from segmentation.schemas import decode_mask_png
from segmentation.service import ModelRegistry
from segmentation.settings import Settings

URL = "/v1/images/segmentations"


def wait_until(condition, timeout: float = 60.0, what: str = "the condition") -> None:
    """Poll `condition` until it holds: on a loaded machine, never a fixed sleep."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


def serve(settings: Settings, loader=None, retry_after: float = 15.0) -> tuple[FastAPI, ModelRegistry]:
    registry = ModelRegistry(settings, loader=loader or Segmenter.from_pretrained, retry_after=retry_after)
    app = FastAPI()
    install_api(app, registry, settings)
    return app, registry


def settings(**overrides) -> Settings:
    return Settings(model=HQ_ID, device="cpu", preload_examples=False, **overrides)


def request(picture_b64: str, prompt) -> dict:
    return {"model": HQ_ID, "image_prompt": picture_b64, "segment_prompt": prompt}


def test_concurrent_requests_over_several_pictures_have_no_crosstalk():
    pictures = [png_b64(make_picture(120 + 8 * i, 80, seed=50 + i)) for i in range(5)]
    prompts = [[[[10 + 7 * i, 20]], [[60, 30 + i], [70, 40]]] for i in range(5)]
    # a cache of ~2 entries for 5 pictures: hits, misses and evictions interleave
    app, registry = serve(settings(cache_mb=3))
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=120) as client:
        solo = [
            decode_mask_png(client.post(URL, json=request(p, q)).json()["data"][0]["b64_json"])
            for p, q in zip(pictures, prompts)
        ]

        def job(i: int):
            response = client.post(URL, json=request(pictures[i % 5], prompts[i % 5]))
            return i, response.status_code, response.json()

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(job, range(40)))
    for i, status, payload in results:
        assert status == 200, payload
        np.testing.assert_array_equal(decode_mask_png(payload["data"][0]["b64_json"]), solo[i % 5])
    stats = registry.cache.stats()
    assert stats.evictions > 0 and stats.hits > 0 and stats.bytes <= stats.max_bytes


@pytest.mark.slow
def test_memory_stays_flat_over_a_long_run():
    app, registry = serve(settings(cache_mb=8))
    pictures = [png_b64(make_picture(96, 64, seed=100 + i)) for i in range(40)]

    def rss_mb() -> float:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as client:

        def burst(count: int, offset: int) -> None:
            for i in range(count):
                response = client.post(URL, json=request(pictures[(i + offset) % 40], [[[10, 10]], [[50, 30]]]))
                assert response.status_code == 200

        burst(60, 0)  # warm-up: allocator pools, cache fill
        gc.collect()
        before = rss_mb()
        burst(200, 60)
        gc.collect()
        after = rss_mb()
    stats = registry.cache.stats()
    assert stats.bytes <= stats.max_bytes
    assert after - before < 150, f"resident memory grew by {after - before:.0f} MB over 200 requests"


def _slow_loader(delay: float):
    def load(name, **kwargs):
        segmenter = Segmenter.from_pretrained(name, **kwargs)
        original = segmenter._encode_unlocked

        def slow(rgb, key):
            time.sleep(delay)
            return original(rgb, key)

        segmenter._encode_unlocked = slow
        return segmenter

    return load


def test_a_full_queue_answers_429_and_the_rest_succeed():
    app, _ = serve(settings(max_queue=1), loader=_slow_loader(0.6))
    pictures = [png_b64(make_picture(64, 48, seed=200 + i)) for i in range(10)]
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=120) as client:
        with ThreadPoolExecutor(10) as pool:
            responses = list(pool.map(lambda p: client.post(URL, json=request(p, [[[5, 5]]])), pictures))
        statuses = sorted(r.status_code for r in responses)
        assert set(statuses) == {200, 429}, statuses
        refused = next(r for r in responses if r.status_code == 429)
        assert refused.headers["retry-after"] and "busy" in refused.json()["error"]["message"]
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert client.post(URL, json=request(pictures[0], [[[5, 5]]])).status_code == 200


def test_model_unloadable_at_start_gives_503_then_recovers():
    attempts = []

    def flaky(name, **kwargs):
        attempts.append(name)
        if len(attempts) == 1:
            raise ModelUnavailableError(f"Model {name!r} could not be loaded: offline and not in the cache.")
        return Segmenter.from_pretrained(name, **kwargs)

    app, _ = serve(settings(), loader=flaky, retry_after=0.3)
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        response = client.post(URL, json=request(png_b64(), [[[5, 5]]]))
        assert response.status_code == 503
        assert "could not be loaded" in response.json()["error"]["message"]
        assert "unavailable" in client.get("/v1/models").json()["data"][0]["status"]
        # answered from memory until retry_after has passed, then loaded: poll, as a client would
        statuses = []
        wait_until(
            lambda: (
                statuses.append(client.post(URL, json=request(png_b64(), [[[5, 5]]])).status_code)
                or statuses[-1] == 200
            ),
            what="the model to load on a retry",
        )
        assert set(statuses) <= {200, 503}
        assert client.get("/v1/models").json()["data"][0]["status"] == "loaded"


def test_out_of_memory_during_an_encode_is_503_and_the_next_request_succeeds(monkeypatch):
    app, registry = serve(settings())
    original = dec.encode
    calls = {"n": 0}

    def once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return original(*args, **kwargs)

    monkeypatch.setattr(dec, "encode", once)
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        assert client.post(URL, json=request(png_b64(make_picture(64, 48, seed=1)), [[[5, 5]]])).status_code == 200
        assert len(registry.cache) == 1
        response = client.post(URL, json=request(png_b64(make_picture(64, 48, seed=2)), [[[5, 5]]]))
        assert response.status_code == 503 and response.json()["error"]["code"] == "resource_exhausted"
        assert len(registry.cache) == 0  # shed
        assert client.post(URL, json=request(png_b64(make_picture(64, 48, seed=2)), [[[5, 5]]])).status_code == 200


def test_a_client_that_disconnects_mid_request_leaves_nothing_behind():
    app, registry = serve(settings(), loader=_slow_loader(1.0))
    picture = png_b64(make_picture(64, 48, seed=300))
    threads_before = threading.active_count()
    with LiveServer(app) as server:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + URL, json=request(picture, [[[5, 5]]]), timeout=0.3)
        # the abandoned encode was admitted before its client left: it finishes and is cached
        wait_until(lambda: len(registry.cache) == 1, what="the abandoned encode to finish")
        segmenter = registry.get()
        wait_until(lambda: segmenter.cache._in_flight == {}, what="nothing left in flight")
        with httpx.Client(base_url=server.url, timeout=60) as client:
            response = client.post(URL, json=request(picture, [[[5, 5]]]))
            assert response.status_code == 200
            assert response.json()["usage"]["input_tokens_details"]["cached_tokens"] == 4096
    wait_until(lambda: threading.active_count() <= threads_before + 2, what="the server's threads to end")


def test_no_path_from_a_request_is_ever_opened(tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(base64.b64decode(png_b64()))
    app, _ = serve(settings())
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        for value in (str(secret), f"file://{secret}", "/etc/hostname"):
            response = client.post(URL, json=request(value, [[[5, 5]]]))
            assert response.status_code == 400, value


def test_gradio_serves_only_the_files_the_app_needs():
    from fastapi.testclient import TestClient

    import app as app_module

    with TestClient(app_module.build_app(settings())) as client:
        for path in ("/etc/passwd", "/proc/self/environ", str(app_module.ASSETS.parent / "app.py")):
            response = client.get(f"/gradio_api/file={path}")
            assert response.status_code in (403, 404), path
        example = app_module.example_pictures()[0]
        assert client.get(f"/gradio_api/file={example}").status_code == 200


def test_image_as_data_url_and_big_float_coordinates_are_fine():
    app, _ = serve(settings())
    buffer = io.BytesIO(base64.b64decode(png_b64()))
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        data_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        response = client.post(URL, json=request(data_url, [[[159.999, 99.999]]]))
        assert response.status_code == 200
