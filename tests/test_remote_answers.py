"""Issue 21 row 8: a page-only process (`app.py --backend URL`) treats its remote as untrusted input.

A fake remote API (a tiny FastAPI app on 127.0.0.1) lists a model id written to break out of a snippet
and answers each bad shape in turn; the page process is driven over raw HTTP as the browser does. Each
bad answer must be a clear 502 JSON error, a huge map refused from its PNG header before any decode."""

from __future__ import annotations

import ast
import base64
import io
import json
import math
import struct
import zlib

import httpx
import numpy as np
import pytest
from conftest import make_picture
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from live_server import LiveServer
from PIL import Image

import app
from segmentation import export
from segmentation.masks import encode_png
from segmentation.settings import Settings

WIDTH, HEIGHT = 320, 200
GOOD_ID = "owner/good-model"
EVIL_ID = 'x", n=1)\nimport os; os.system("echo pwned")  # '


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(make_picture(WIDTH, HEIGHT, seed=8)).save(buffer, "PNG")
    return buffer.getvalue()


def header_only_png(width: int, height: int) -> bytes:
    """A PNG whose header announces width × height, with a few bytes of pixels: decoding it would allocate."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1000)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def answer(png: bytes, segments: list, maps: int = 1) -> dict:
    mask = {"b64_json": base64.b64encode(png).decode(), "label": None, "score": 0.5, "segments": segments}
    return {"created": 1, "data": [mask] * maps, "usage": None}


def segment(value: int = 1, score: float = 0.5) -> dict:
    return {"value": value, "score": score, "area": 10, "bbox": [0, 0, 3, 3]}


def good(width: int, height: int, objects: int = 1, maps: int = 1) -> dict:
    labels = np.zeros((height, width), dtype=np.uint8)
    labels[: height // 2, : width // 2] = 1
    return answer(encode_png(labels), [segment(v) for v in range(1, objects + 1)], maps)


BAD_ANSWERS = {
    "a map far larger than asked (8000x8000)": (
        lambda w, h: answer(header_only_png(8000, 8000), [segment()]),
        "8000x8000",
    ),
    "a 14000x14000 map": (lambda w, h: answer(header_only_png(14000, 14000), [segment()]), "14000x14000"),
    "no maps": (lambda w, h: {"created": 1, "data": [], "usage": None}, "0 label maps"),
    "more maps than asked": (lambda w, h: good(w, h, maps=4), "4 label maps"),
    "maps without segments": (lambda w, h: answer(encode_png(np.zeros((h, w), np.uint8)), []), "one segment per"),
    "a score that is not a number": (
        lambda w, h: answer(encode_png(np.zeros((h, w), np.uint8)), [segment(score=math.nan)]),
        "not numbers",
    ),
    "values beyond the objects": (lambda w, h: answer(encode_png(np.full((h, w), 7, np.uint8)), [segment()]), "beyond"),
    "not a PNG": (lambda w, h: answer(b"GIF89a" + b"\0" * 40, [segment()]), "not a PNG"),
    "a colour PNG": (lambda w, h: answer(_rgb_png(w, h), [segment()]), "grayscale"),
    "not base64": (lambda w, h: {"created": 1, "data": [{"b64_json": "%%%", "segments": [segment()]}]}, "not base64"),
    "not a segmentation answer": (lambda w, h: {"data": "nothing"}, "not a segmentation answer"),
    "not JSON": (lambda w, h: "<html>oops</html>", "not a segmentation answer"),
    "a body longer than any map (streamed)": (lambda w, h: _endless(), "more than"),
}


def _endless():
    """64 MiB of JSON whitespace in 1 MiB chunks, no Content-Length: the page must stop reading early."""
    for _ in range(64):
        yield b" " * 2**20


def _rgb_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def remote():
    """The fake remote: `/v1/models` lists a hostile id, segmentations answer what `remote.mode` says (the
    1×1 answer of an embed is always a good one)."""
    fake = FastAPI()
    state = {"mode": "good"}

    @fake.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": EVIL_ID}, {"id": GOOD_ID}, {"id": 7}, {"id": "../etc"}]}

    @fake.post("/v1/images/segmentations")
    async def segmentations(request: Request) -> Response:
        body = await request.json()
        objects = len(body["segment_prompt"])
        width, height = (int(v) for v in (body.get("size") or f"{WIDTH}x{HEIGHT}").split("x"))
        if (width, height) == (1, 1) or state["mode"] == "good":
            return JSONResponse(good(width, height, objects, maps=body.get("n", 1)))
        made = BAD_ANSWERS[state["mode"]][0](width, height)
        if isinstance(made, str):
            return Response(made, media_type="text/html")
        if not isinstance(made, dict):
            return StreamingResponse(made, media_type="application/json")
        return Response(json.dumps(made), media_type="application/json")  # NaN as JSON's NaN literal

    with LiveServer(fake) as live:
        live.state = state
        yield live


@pytest.fixture(scope="module")
def page(remote):
    application = app.build_app(Settings(preload_examples=False), backend_url=remote.url)
    application.state.page.store.per_client = 100  # a session per case from one address (test_sessions_public)
    with LiveServer(application) as live:
        yield live


def test_remote_model_ids_are_checked_and_never_code_in_a_snippet(remote, page):
    remote.state["mode"] = "good"
    with httpx.Client(base_url=page.url, timeout=60) as http:
        config = http.post("/ui/session").json()
        assert config["models"] == [GOOD_ID] and config["model"] == GOOD_ID, "only ids that look like ids"
        sid = config["session"]
        assert http.post(f"/ui/session/{sid}/picture", content=png_bytes()).status_code == 200
        http.post(f"/ui/session/{sid}/op", json={"op": "embed"})
        view = http.post(f"/ui/session/{sid}/op", json={"op": "click", "x": 50, "y": 40}).json()
        refused = http.post(f"/ui/session/{sid}/op", json={"op": "settings", "model": EVIL_ID})
        assert refused.status_code == 400
        snippet = http.get(f"/ui/session/{sid}/download/{view['rev']}/snippet.py")
        assert snippet.status_code == 200 and GOOD_ID in snippet.text
    # an id that does reach a snippet (a local model, another deployment) is a quoted string, never code
    code = export.api_snippets('http://h/"; x', EVIL_ID, [[[1, 2]]], [[1]], 'a".png')
    tree = ast.parse(code)
    assert not any(
        isinstance(node, (ast.Import, ast.ImportFrom)) and node.names[0].name == "os" for node in ast.walk(tree)
    )
    models = [
        kw.value.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        for kw in node.keywords
        if kw.arg == "model"
    ]
    assert models == [EVIL_ID, EVIL_ID]


@pytest.mark.parametrize("mode", list(BAD_ANSWERS))
def test_each_bad_remote_answer_is_a_clear_502_and_nothing_huge_is_decoded(remote, page, mode, monkeypatch):
    opened: list[tuple[int, int]] = []
    original = Image.open

    def spy(*args, **kwargs):
        image = original(*args, **kwargs)
        opened.append(image.size)
        return image

    monkeypatch.setattr(Image, "open", spy)
    remote.state["mode"] = "good"
    with httpx.Client(base_url=page.url, timeout=60) as http:
        sid = http.post("/ui/session").json()["session"]
        assert http.post(f"/ui/session/{sid}/picture", content=png_bytes()).status_code == 200
        assert http.post(f"/ui/session/{sid}/op", json={"op": "embed"}).status_code == 200
        remote.state["mode"] = mode
        opened.clear()
        refused = http.post(f"/ui/session/{sid}/op", json={"op": "click", "x": 50, "y": 40})
        assert refused.status_code == 502, refused.text
        error = refused.json()["error"]
        assert error["code"] == "backend_bad_answer" and BAD_ANSWERS[mode][1] in error["message"], error
        assert "Traceback" not in refused.text
        assert all(w * h <= WIDTH * HEIGHT for w, h in opened), f"a map of {opened} was opened"
        remote.state["mode"] = "good"
        view = http.post(f"/ui/session/{sid}/op", json={"op": "click", "x": 60, "y": 40}).json()
        assert [o["points"] for o in view["objects"]] == [[[60, 40]]], "the refused click was not stored"
