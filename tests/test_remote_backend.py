"""`app.py --backend URL`: the page served by a process with no model, its segmentation done by a real
API server (a live uvicorn server on the tiny checkpoint), driven over raw HTTP like the browser does."""

from __future__ import annotations

import base64
import io
import threading
import time

import httpx
import numpy as np
import pytest
from conftest import HQ_ID, make_picture
from live_server import LiveServer, free_port
from PIL import Image

import app
from segmentation import everything as everything_module
from segmentation import service
from segmentation.settings import Settings

WIDTH, HEIGHT = 320, 200


def png_bytes(seed=5) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(make_picture(WIDTH, HEIGHT, seed=seed)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def backend():
    application = app.build_app(Settings(model=HQ_ID, preload_examples=False, device="cpu"))
    application.state.registry.get()  # loaded before the page starts: any later load is the page's
    with LiveServer(application) as live:
        yield live


@pytest.fixture(scope="module")
def page(backend):
    """The page process: built while model construction is forbidden in this process."""
    built: list[str] = []
    original = service.ModelRegistry.__init__

    def spy(self, *args, **kwargs):
        built.append("registry")
        original(self, *args, **kwargs)

    service.ModelRegistry.__init__ = spy
    try:
        application = app.build_app(Settings(model=HQ_ID, preload_examples=False), backend_url=backend.url)
        assert not hasattr(application.state, "registry")
        with LiveServer(application) as live:
            live.built = built
            yield live
    finally:
        service.ModelRegistry.__init__ = original


def op(client, sid, **body) -> dict:
    response = client.post(f"/ui/session/{sid}/op", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def run_client_snippet(snippet: str, picture: bytes, folder, expected_png: bytes) -> None:
    """Run the snippet's first half (our client) as a user would, beside the picture it names."""
    import os

    from segmentation.masks import decode_png

    ours = snippet.split("# The AI Refinery SDK")[0]
    name = ours.split('image="', 1)[1].split('"', 1)[0]
    (folder / name).write_bytes(picture)
    here = os.getcwd()
    os.chdir(folder)
    try:
        scope: dict = {}
        exec(compile(ours, "snippet.py", "exec"), scope)
    finally:
        os.chdir(here)
    assert (scope["labels"] == decode_png(expected_png)).all(), "the snippet reproduces the map on screen"


def test_the_page_segments_through_the_remote_api_and_holds_no_model(backend, page, tmp_path):
    picture = png_bytes()
    with httpx.Client(base_url=page.url, timeout=120) as client, httpx.Client(base_url=backend.url, timeout=120) as api:
        config = client.post("/ui/session").json()
        assert config["models"] == [HQ_ID] and config["banner"] is None
        sid = config["session"]
        assert client.post(f"/ui/session/{sid}/picture", content=picture).status_code == 200
        assert op(client, sid, op="embed")["picture"]["embedded"]
        view = op(client, sid, op="click", x=100, y=80, include=True)
        assert view["map"] and len(view["thumbnails"]) == 3, "a one-point object's candidates via n=3"
        op(client, sid, op="choose", candidate=1)
        op(client, sid, op="box", x0=40, y0=30, x1=200, y1=150)
        op(client, sid, op="new")
        view = op(client, sid, op="click", x=260, y=160, include=True)
        view = op(client, sid, op="click", x=250, y=40, include=False)
        preview = Image.open(io.BytesIO(base64.b64decode(view["map"])))
        assert preview.size == tuple(view["picture"]["preview"])
        rev = view["rev"]
        mask = client.get(f"/ui/session/{sid}/download/{rev}/mask.png")
        assert mask.status_code == 200, mask.text
        document = client.get(f"/ui/session/{sid}/download/{rev}/objects.json").json()
        objects = document["objects"]
        assert objects[0]["box"] == [40, 30, 200, 150] and "box" not in objects[1]
        direct = api.post(
            "/v1/images/segmentations",
            json={
                "model": HQ_ID,
                "image_prompt": base64.b64encode(picture).decode(),
                "segment_prompt": [o["points"] for o in objects],
                "point_labels": [o["labels"] for o in objects],
                "box_prompt": [o.get("box") for o in objects],
            },
        ).json()
        assert base64.b64decode(direct["data"][0]["b64_json"]) == mask.content, "the remote API's bytes"
        assert direct["usage"]["input_tokens_details"]["cached_tokens"] > 0, "the remote embedded it once"
        response = client.get(f"/ui/session/{sid}/download/{rev}/response.json").json()
        assert response["data"][0]["b64_json"] == direct["data"][0]["b64_json"]
        assert response["usage"]["input_tokens_details"]["point_tokens"] == 5  # 3 points + a box's 2 corners
        assert client.get(f"/ui/session/{sid}/download/{rev}/cutout.png").status_code == 200
        snippet = client.get(f"/ui/session/{sid}/download/{rev}/snippet.py").text
        assert f'SegmentationClient("{backend.url}")' in snippet, "the snippet names the API, not the page"
        assert "box_prompt=[[40.0, 30.0, 200.0, 150.0], None]," in snippet
        assert '"box_prompt": [[40.0, 30.0, 200.0, 150.0], None]' in snippet
        run_client_snippet(snippet, picture, tmp_path, mask.content)
        bad = client.post(f"/ui/session/{sid}/op", json={"op": "box", "x0": 5, "y0": 5, "x1": 5, "y1": 90})
        assert bad.status_code == 400 and "area" in bad.json()["error"]["message"]
    assert page.built == [], "the page process never built a model registry"


EVERYTHING = {"points_per_side": 5, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.05, "box_nms_thresh": 1.0}


def _until(client, sid, done, seconds=120.0) -> dict:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        status = client.get(f"/ui/session/{sid}/everything").json()
        if done(status):
            return status
        time.sleep(0.05)
    raise AssertionError(f"timed out; last status {status}")


def test_everything_through_the_remote_api_becomes_page_objects_and_cancel_drops_it(backend, page, monkeypatch):
    """The remote runs segment_everything in one request (no batches: total 0, the page's bar has no value);
    its answer names each object's grid point, which becomes a one-point page object, as with a local model."""
    picture = png_bytes(seed=8)
    with httpx.Client(base_url=page.url, timeout=120) as client, httpx.Client(base_url=backend.url, timeout=120) as api:
        sid = client.post("/ui/session").json()["session"]
        assert client.post(f"/ui/session/{sid}/picture", content=picture).status_code == 200
        started = client.post(f"/ui/session/{sid}/everything", json=EVERYTHING).json()
        assert started["state"] == "running" and started["total"] == 0
        assert _until(client, sid, lambda s: s["state"] != "running")["state"] == "finished"
        view = client.post(f"/ui/session/{sid}/everything/apply").json()
        width, height = view["picture"]["preview"]
        direct = api.post(
            "/v1/images/segmentations",
            json={
                "model": HQ_ID,
                "image_prompt": base64.b64encode(picture).decode(),
                "segment_everything": EVERYTHING,
                "size": f"{width}x{height}",
            },
        ).json()
        segments = direct["data"][0]["segments"]
        assert len(segments) >= 2 and all(len(s["point"]) == 2 for s in segments)
        assert [o["points"] for o in view["objects"]] == [[s["point"]] for s in segments]  # exact, best first
        assert all(o["labels"] == [1] for o in view["objects"]) and "Everything found" in view["status"]
        shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(view["map"]))))
        expected = np.asarray(Image.open(io.BytesIO(base64.b64decode(direct["data"][0]["b64_json"]))))
        assert np.mean(shown == expected) >= 0.99  # the page's decode of each point gives the generator's masks
        plain = api.post(  # a prompt's answer keeps its wire format: no point
            "/v1/images/segmentations",
            json={"model": HQ_ID, "image_prompt": base64.b64encode(picture).decode(), "segment_prompt": [[[9, 9]]]},
        ).json()
        assert "point" not in plain["data"][0]["segments"][0]

        # Cancel drops the request at once (the remote is held mid-request meanwhile, so the run is surely in
        # flight); the page starts no second run before the first request has ended.
        released = threading.Event()
        generate = everything_module.generate

        def held(*args, **kwargs):
            assert released.wait(60)
            return generate(*args, **kwargs)

        monkeypatch.setattr(everything_module, "generate", held)
        assert client.post(f"/ui/session/{sid}/everything", json=EVERYTHING).json()["state"] == "running"
        assert client.delete(f"/ui/session/{sid}/everything").json()["state"] == "cancelled"
        assert client.post(f"/ui/session/{sid}/everything/apply").status_code == 400
        again = client.post(f"/ui/session/{sid}/everything", json=EVERYTHING)
        assert again.status_code == 400 and "not stopped yet" in again.json()["error"]["message"], again.text
        released.set()
        end = time.monotonic() + 120
        while (again := client.post(f"/ui/session/{sid}/everything", json=EVERYTHING)).status_code != 200:
            assert again.status_code == 400 and "not stopped yet" in again.json()["error"]["message"], again.text
            assert time.monotonic() < end, "the cancelled request never ended"
            time.sleep(0.05)
        assert again.json()["state"] == "running"
        _until(client, sid, lambda s: s["state"] != "running")  # not left running on the remote past this test


def test_remote_failures_become_page_messages(backend):
    secured = app.build_app(Settings(model=HQ_ID, preload_examples=False, device="cpu", api_keys=("right",)))
    missing = "syscv-community/sam-hq-vit-large"  # not in the test cache (HF_HUB_OFFLINE=1): the remote says 503
    weightless = app.build_app(Settings(model=missing, preload_examples=False, device="cpu"))
    with LiveServer(secured) as keyed, LiveServer(weightless) as unavailable:
        for url, key, status, words in [
            (keyed.url, "wrong", 502, "refused this page's key"),
            (unavailable.url, None, 503, "cannot segment now"),
            (f"http://127.0.0.1:{free_port()}", None, 502, "not reachable"),
        ]:
            front = app.build_app(Settings(model=HQ_ID, preload_examples=False), backend_url=url, backend_key=key)
            with LiveServer(front) as live, httpx.Client(base_url=live.url, timeout=60) as client:
                sid = client.post("/ui/session").json()["session"]
                assert client.post(f"/ui/session/{sid}/picture", content=png_bytes()).status_code == 200
                answer = client.post(f"/ui/session/{sid}/op", json={"op": "embed"})
                assert answer.status_code == status, answer.text
                assert words in answer.json()["error"]["message"]
                assert "Traceback" not in answer.text


def test_the_page_only_process_caps_bodies_like_the_full_server():
    from test_security import _raw_headers_only

    page_only = app.build_app(
        Settings(model=HQ_ID, preload_examples=False), backend_url=f"http://127.0.0.1:{free_port()}"
    )
    with LiveServer(page_only) as live:
        for path in ("/ui/session/anything/picture", "/gradio_api/queue/join"):
            status, _ = _raw_headers_only(live, "POST", path, 2**30)
            assert status == 413, path


def test_backend_flags_and_environment(monkeypatch):
    monkeypatch.setenv("SAMHQ_BACKEND_URL", "http://api.internal:8000")
    monkeypatch.setenv("SAMHQ_BACKEND_KEY", "k1")
    args = app.parse_args([])
    assert (args.backend, args.backend_key) == ("http://api.internal:8000", "k1")
    args = app.parse_args(["--backend", "http://other:1", "--backend-key", "k2"])
    assert (args.backend, args.backend_key) == ("http://other:1", "k2")
