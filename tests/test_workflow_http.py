"""The labeling workflow from raw HTTP against a live app: several pictures in one session, each keeping its
objects and history; the next picture's embedding prefetched (seen from outside: the strip's listing says it
is ready, and moving there answers from the cache); the picture limit; exports whose label values are the
visible numbers with a gap, in today's downloads too; the byte and time limits of an export; unknown pictures."""

from __future__ import annotations

import dataclasses
import io
import json
import time
import zipfile

import httpx
import numpy as np
import pytest
from conftest import HQ_ID, make_picture
from live_server import LiveServer
from PIL import Image

PICTURES_PER_SESSION = 4


@pytest.fixture(scope="module")
def server():
    import app as app_module
    from segmentation.settings import Settings

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SAMHQ_UI_PICTURES_PER_SESSION", str(PICTURES_PER_SESSION))
        application = app_module.build_app(Settings(model=HQ_ID, preload_examples=False, device="cpu"))
    with LiveServer(application) as live:
        yield live


def _jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(make_picture(160, 120, seed=seed)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _session(http: httpx.Client, count: int, seed: int) -> str:
    """A session with `count` pictures added at once (the first shown) and the first one embedded."""
    sid = http.post("/ui/session").json()["session"]
    for i in range(count):
        answer = http.post(
            f"/ui/session/{sid}/picture?add=1&show={int(i == 0)}",
            content=_jpeg(seed + i),
            headers={"X-Filename": f"shot-{i}.jpg"},
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["album"] == {"count": i + 1, "current": 0}
    assert http.post(f"/ui/session/{sid}/op", json={"op": "embed"}).status_code == 200
    return sid


def _edit(http: httpx.Client, sid: str, *ops: dict) -> dict:
    for op in ops:
        answer = http.post(f"/ui/session/{sid}/op", json=op)
        assert answer.status_code == 200, answer.text
    return answer.json()


def _gap(http: httpx.Client, sid: str) -> dict:
    """Three objects, then Object 1 deleted: Objects 2 and 3 remain (a gap at 1)."""
    return _edit(
        http,
        sid,
        {"op": "click", "x": 20, "y": 20},
        {"op": "new"},
        {"op": "click", "x": 120, "y": 30},
        {"op": "new"},
        {"op": "click", "x": 80, "y": 100},
        {"op": "select", "number": 1},
        {"op": "delete"},
    )


def _values(png: bytes) -> set[int]:
    return set(np.unique(np.asarray(Image.open(io.BytesIO(png)))).tolist())


def _listing(http: httpx.Client, sid: str) -> dict:
    answer = http.get(f"/ui/session/{sid}/pictures")
    assert answer.status_code == 200
    return answer.json()


def test_pictures_keep_their_objects_the_next_is_prefetched_and_the_limit_holds(server):
    with httpx.Client(base_url=server.url, timeout=120) as http:
        sid = _session(http, 3, seed=40)
        listing = _listing(http, sid)
        assert [p["name"] for p in listing["pictures"]] == ["shot-0.jpg", "shot-1.jpg", "shot-2.jpg"]
        assert listing["current"] == 0 and listing["pictures"][0]["ready"]
        view = _gap(http, sid)
        assert [o["number"] for o in view["objects"]] == [2, 3]

        # the next picture's embedding is computed in the background: the listing reports it ready
        deadline = time.monotonic() + 120
        while not (listing := _listing(http, sid))["pictures"][1]["ready"]:
            assert time.monotonic() < deadline, listing
            time.sleep(0.05)
        assert not listing["pictures"][2]["ready"], "only the next picture is prefetched"
        assert [p["objects"] for p in listing["pictures"]] == [2, 0, 0]

        # moving on answers without the image encoder
        view = http.post(f"/ui/session/{sid}/pictures/1").json()
        assert view["album"] == {"count": 3, "current": 1} and view["picture"]["name"] == "shot-1.jpg"
        assert view["picture"]["embedded"] and not any(o["points"] for o in view["objects"])
        assert view["status"] == "Picture 2 of 3: shot-1.jpg — ready."  # the prefetch's key, found cached
        _edit(http, sid, {"op": "click", "x": 60, "y": 60})

        # back: the first picture's objects, numbers and history as they were left
        view = http.post(f"/ui/session/{sid}/pictures/0").json()
        assert [o["number"] for o in view["objects"]] == [2, 3] and view["map"] is not None
        assert [len(o["points"]) for o in view["objects"]] == [1, 1]
        view = _edit(http, sid, {"op": "undo"})  # the active object (Object 2) loses its point
        assert [len(o["points"]) for o in view["objects"]] == [0, 1]
        view = _edit(http, sid, {"op": "redo"})
        assert [len(o["points"]) for o in view["objects"]] == [1, 1]
        assert [p["objects"] for p in _listing(http, sid)["pictures"]] == [2, 1, 0]

        # unknown pictures: 404 with a message
        for answer in (
            http.post(f"/ui/session/{sid}/pictures/3"),
            http.get(f"/ui/session/{sid}/pictures/7/thumb.jpg"),
            http.get(f"/ui/session/{sid}/export/picture/9.zip"),
        ):
            assert answer.status_code == 404 and answer.json()["error"]["code"] == "no_such_picture"
        assert http.get(f"/ui/session/{sid}/pictures/2/thumb.jpg").headers["content-type"] == "image/jpeg"

        # the picture limit, refused before the body is read, with a message in words
        assert http.post(f"/ui/session/{sid}/picture?add=1&show=0", content=_jpeg(50)).status_code == 200
        refused = http.post(f"/ui/session/{sid}/picture?add=1&show=0", content=_jpeg(51))
        assert refused.status_code == 409, refused.text
        error = refused.json()["error"]
        assert error["code"] == "too_many_pictures" and f"at most {PICTURES_PER_SESSION} pictures" in error["message"]
        assert _listing(http, sid)["count"] == PICTURES_PER_SESSION

        # a picture added by mistake goes with its files; the next one is shown with its own objects
        view = http.delete(f"/ui/session/{sid}/pictures/0").json()
        assert view["album"] == {"count": 3, "current": 0} and view["picture"]["name"] == "shot-1.jpg"
        assert [len(o["points"]) for o in view["objects"]] == [1]
        assert [p["name"] for p in _listing(http, sid)["pictures"]] == ["shot-1.jpg", "shot-2.jpg", "picture.jpg"]


def test_exports_write_the_visible_numbers_with_a_gap_and_hold_their_limits(server):
    with httpx.Client(base_url=server.url, timeout=120) as http:
        sid = _session(http, 2, seed=60)
        view = _gap(http, sid)
        _edit(http, sid, {"op": "select", "number": 3}, {"op": "category", "name": "dog"})
        too_long = http.post(f"/ui/session/{sid}/op", json={"op": "category", "name": "x" * 65})
        assert too_long.status_code == 400 and "64 characters" in too_long.json()["error"]["message"]
        view = _edit(http, sid, {"op": "select", "number": 2})
        assert [(o["number"], o["category"]) for o in view["objects"]] == [(2, "object"), (3, "dog")]

        # today's single-picture downloads: value = visible number
        base = f"/ui/session/{sid}/download/{view['rev']}/"
        mask = http.get(base + "mask.png").content
        assert 1 not in _values(mask) and _values(mask) - {0}, _values(mask)
        objects = http.get(base + "objects.json").json()["objects"]
        assert [(o["value"], o["name"], o["category"]) for o in objects] == [
            (2, "Object 2", "object"),
            (3, "Object 3", "dog"),
        ]

        # this picture's zip
        answer = http.get(f"/ui/session/{sid}/export/picture/0.zip")
        assert answer.status_code == 200 and answer.headers["content-type"] == "application/zip"
        assert answer.headers["content-disposition"] == 'attachment; filename="shot-0.zip"'
        with zipfile.ZipFile(io.BytesIO(answer.content)) as archive:
            names = set(archive.namelist())
            assert archive.read("masks/shot-0.png") == mask, "the kept result is the download's map"
            assert "objects/shot-0/object_1.png" not in names
            assert {"images/shot-0.jpg", "labels/shot-0.txt"} <= names

        # the whole session's zip: every picture, the second one without objects
        answer = http.get(f"/ui/session/{sid}/export/session.zip")
        assert answer.status_code == 200, answer.text
        assert int(answer.headers["content-length"]) == len(answer.content)
        with zipfile.ZipFile(io.BytesIO(answer.content)) as archive:
            assert archive.read("masks/shot-0.png") == mask
            assert _values(archive.read("masks/shot-1.png")) == {0}
            coco = json.loads(archive.read("annotations/instances_rle.json"))
            assert archive.read("labels/shot-1.txt") == b""
        assert sorted(c["name"] for c in coco["categories"]) == ["dog", "object"]
        numbers = sorted(a["object_number"] for a in coco["annotations"])
        assert set(numbers) <= {2, 3} and numbers

        # the limits: bytes per zip, time per export; a clear 4xx, and the next export works again
        routes = server.server.config.app.state.page  # the documented settings, changed for this test only
        options = routes.options
        try:
            routes.options = dataclasses.replace(options, export_bytes=2000)
            for path in ("session.zip", "picture/0.zip"):
                refused = http.get(f"/ui/session/{sid}/export/{path}")
                assert refused.status_code == 413, refused.text
                error = refused.json()["error"]
                assert error["code"] == "export_too_large" and "MB limit" in error["message"]
            routes.options = dataclasses.replace(options, export_seconds=0)
            refused = http.get(f"/ui/session/{sid}/export/session.zip")
            assert refused.status_code == 413 and refused.json()["error"]["code"] == "export_too_slow"
        finally:
            routes.options = options
        assert http.get(f"/ui/session/{sid}/export/session.zip").status_code == 200
        assert routes.store.get(sid).export_bytes == 0, "the export's reservation is released"
