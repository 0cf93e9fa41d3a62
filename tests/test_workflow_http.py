"""The labeling workflow from raw HTTP against a live app: several pictures in one session, each keeping its
objects and history; the next picture's embedding prefetched (seen from outside: the strip's listing says it
is ready, and moving there answers from the cache); the picture limit; exports whose label values are the
visible numbers with a gap, in today's downloads too; the byte and time limits of an export; unknown pictures."""

from __future__ import annotations

import dataclasses
import io
import json
import socket
import threading
import time
import zipfile
from urllib.parse import quote

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
        for answer in (
            http.post(f"/ui/session/{sid}/pictures/abc"),
            http.get(f"/ui/session/{sid}/export/picture/1.5.zip"),
        ):
            assert 400 <= answer.status_code < 500 and "index" in answer.json()["error"]["message"], answer.text

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


def _noise_png(side: int, seed: int) -> bytes:
    """A picture whose zip can't hide in the sockets' buffers (stored, ~6 MB): a stalled reader really stalls."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(
        buffer, "PNG", compress_level=0
    )
    return buffer.getvalue()


def _request_zip(server, sid: str) -> socket.socket:
    """GET the session's zip over a raw socket with a tiny receive window, and read only its status line."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    sock.sendall(f"GET /ui/session/{sid}/export/session.zip HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert sock.recv(12) == b"HTTP/1.1 200"
    return sock


def _until(condition, what: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_export_names_and_downloads_that_end_early_free_the_session(server):
    """Attacker review: a picture named in other letters (a raw UTF-8 Content-Disposition was a 500 that left
    the session "exporting" for good); a download whose client hung up (its export stayed "being prepared",
    429, until the garbage collector came) or stopped reading (held for good); an export's bytes that stopped
    counting against the disk budget when its session closed while it was sent; a long name losing its
    extension; the kept files an export reads, replaced meanwhile."""
    routes = server.server.config.app.state.page
    store, options = routes.store, routes.options
    with httpx.Client(base_url=server.url, timeout=120) as http:
        sid = http.post("/ui/session").json()["session"]
        for i, (name, content) in enumerate([(quote("写真.png"), _noise_png(1400, 0)), ("y" * 300 + ".png", _jpeg(1))]):
            answer = http.post(
                f"/ui/session/{sid}/picture?add=1&show={int(i == 0)}", content=content, headers={"X-Filename": name}
            )
            assert answer.status_code == 200, answer.text
        names = [p["name"] for p in _listing(http, sid)["pictures"]]
        assert names[0] == "写真.png" and names[1].endswith(".png") and len(names[1]) == 100, names

        answer = http.get(f"/ui/session/{sid}/export/picture/0.zip")
        assert answer.status_code == 200, answer.text
        disposition = answer.headers["content-disposition"]
        assert disposition == "attachment; filename=\"__.zip\"; filename*=UTF-8''%E5%86%99%E7%9C%9F.zip"
        assert "images/写真.png" in zipfile.ZipFile(io.BytesIO(answer.content)).namelist()
        # the next export right after the last byte: the session is free again before it is sent
        assert http.get(f"/ui/session/{sid}/export/picture/1.zip").status_code == 200

        entry = store.get(sid)
        _request_zip(server, sid).close()  # hung up after the status line
        _until(lambda: not entry.exporting and entry.export_bytes == 0, "a hung-up download frees the session")
        whole = http.get(f"/ui/session/{sid}/export/session.zip")
        assert whole.status_code == 200 and int(whole.headers["content-length"]) == len(whole.content) > 5 * 10**6

        routes.options = dataclasses.replace(options, export_send_timeout=1.0)
        try:
            stalled = _request_zip(server, sid)  # reads nothing more
            _until(lambda: entry.export_bytes > 5 * 10**6, "the stalled export's zip is written")
            held = entry.export_bytes
            replaced = http.post(f"/ui/session/{sid}/picture", content=_jpeg(1), headers={"X-Filename": "new.jpg"})
            assert replaced.status_code == 409 and replaced.json()["error"]["code"] == "busy", replaced.text
            assert http.post(f"/ui/session/{sid}/pictures/1").status_code == 200  # clicks and moves go on
            assert http.delete(f"/ui/session/{sid}").status_code == 204
            assert store.disk >= held, "a closed session's zip still being sent counts against the disk budget"
            _until(lambda: store.disk < held, "a client that stopped reading is let go, and its zip with it")
            stalled.close()
        finally:
            routes.options = options


def test_an_export_lets_other_visitors_click_between_its_pictures(server, monkeypatch):
    """Attacker review: bringing an export's results up to date (every picture's, after a setting changed) held
    one model slot for the whole export; now each picture is a step of its own, other requests first. And the
    exports being prepared on the server are bounded (each up to SAMHQ_UI_EXPORT_SECONDS of CPU)."""
    from segmentation.service import AdmissionGate
    from ui import workflow_routes

    routes = server.server.config.app.state.page
    with httpx.Client(base_url=server.url, timeout=120) as http:
        other = _session(http, 1, seed=80)
        sid = _session(http, 2, seed=82)
        _edit(http, sid, {"op": "click", "x": 20, "y": 20})
        assert http.post(f"/ui/session/{sid}/pictures/1").status_code == 200
        _edit(http, sid, {"op": "embed"}, {"op": "click", "x": 30, "y": 30}, {"op": "settings", "hq_only": True})

        clicked, steps = threading.Event(), []
        full = routes.backend.full

        def click() -> None:
            with httpx.Client(base_url=server.url, timeout=120) as visitor:
                assert (
                    visitor.post(f"/ui/session/{other}/op", json={"op": "click", "x": 50, "y": 50}).status_code == 200
                )
            clicked.set()

        def spy(*args, **kwargs):  # each picture's result: the other visitor's click arrives during the first
            if not steps:
                threading.Thread(target=click, daemon=True).start()
                _until(lambda: routes.gate._waiting >= 1, "the other visitor's click waits for the model")
                steps.append(True)
                # exports prepared at once on the server are bounded (1 here): the other visitor's must wait
                refused = httpx.get(f"{server.url}/ui/session/{other}/export/session.zip", timeout=60)
                steps.append(refused.status_code == 429 and "other exports" in refused.json()["error"]["message"])
            else:
                steps.append(clicked.wait(timeout=30))  # answered before the export's next picture
            return full(*args, **kwargs)

        monkeypatch.setattr(routes, "gate", AdmissionGate(max_concurrent=1, max_waiting=8))
        monkeypatch.setattr(routes.backend, "full", spy)
        monkeypatch.setattr(workflow_routes, "EXPORTS_AT_ONCE", 1)
        assert http.get(f"/ui/session/{sid}/export/session.zip").status_code == 200
        assert steps == [True, True, True], steps
        assert http.get(f"/ui/session/{other}/export/session.zip").status_code == 200, "its turn came"
