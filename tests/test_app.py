"""The page from the outside: its typed session state, its JSON routes over raw HTTP against a live
server, Gradio's own queue protocol as a stranger would speak it, and the bounds on sessions and disk."""

from __future__ import annotations

import gc
import io
import json
import pickle
import time
from pathlib import Path

import httpx
import pytest
from conftest import HQ_ID, make_picture
from live_server import LiveServer
from PIL import Image

import app
from segmentation.masks import decode_png
from segmentation.settings import Settings
from ui import state as st


def png_bytes(width=320, height=200, seed=4) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(make_picture(width, height, seed=seed)).save(buffer, "PNG")
    return buffer.getvalue()


def build(**changes):
    return app.build_app(Settings(model=HQ_ID, preload_examples=False, device="cpu", **changes))


@pytest.fixture(scope="module")
def server():
    with LiveServer(build()) as live:
        yield live


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def open_session(http, picture: bytes | None = None) -> tuple[str, dict]:
    sid = http.post("/ui/session").json()["session"]
    view = None
    if picture is not None:
        response = http.post(f"/ui/session/{sid}/picture", content=picture, headers={"X-Filename": "p.png"})
        assert response.status_code == 200, response.text
        view = op(http, sid, op="embed")
    return sid, view


def op(http, sid, **body) -> dict:
    response = http.post(f"/ui/session/{sid}/op", json=body)
    assert response.status_code == 200, response.text
    return response.json()


# ---- the typed state ----------------------------------------------------------------------------


def test_edits_are_plain_functions_of_the_state_and_never_renumber():
    session = st.Session(id="s", model="m")
    st.add_point(session, 1, 2, True)
    st.new_object(session)
    st.new_object(session)  # the active object is still empty: reused
    st.add_point(session, 3, 4, False)
    st.new_object(session)
    st.add_point(session, 5, 6, True)
    assert [o.number for o in session.objects] == [1, 2, 3] and session.active == 2
    st.undo_point(session)
    st.undo_point(session)  # nothing left in Object 3: nothing else changes
    assert [o.number for o in session.objects] == [1, 2, 3] and session.objects[1].points == [[3, 4]]
    st.redo_point(session)
    assert session.objects[2].points == [[5, 6]]
    st.select_object(session, 2)
    st.delete_object(session)
    assert [o.number for o in session.objects] == [1, 3], "the others keep their numbers"
    rev = session.rev
    st.choose_candidate(session, 2)
    assert session.active_object.choice == 2 and session.rev == rev + 1
    st.add_point(session, 7, 8, True)
    assert session.active_object.choice == 0 and not session.active_object.redo
    assert session.objects[0].box is None
    st.clear_all(session)
    assert [o.number for o in session.objects] == [1] and not session.prompted()
    assert len(pickle.dumps(session)) < 2000, "keys and prompts only"


def test_a_box_is_an_edit_like_a_point_and_replaces_the_previous_box():
    session = st.Session(id="s", model="m")
    session.picture = st.Picture("p", 100, 80, (100, 80), "/nowhere")
    st.set_box(session, 90, 70, 10, 200)  # corners in any order, clamped to the picture
    assert session.active_object.box == [10, 70, 90, 80] and session.prompted()
    st.add_point(session, 50, 75, False)
    st.set_box(session, 20, 20, 60, 60)
    st.undo_point(session)  # the newest box goes, the one it replaced comes back
    assert session.active_object.box == [10, 70, 90, 80] and session.active_object.points == [[50, 75]]
    st.undo_point(session)
    st.undo_point(session)
    assert session.active_object.box is None and not session.prompted()
    st.redo_point(session)
    st.redo_point(session)
    assert session.active_object.box == [10, 70, 90, 80] and session.active_object.points == [[50, 75]]
    with pytest.raises(ValueError, match="area"):
        st.set_box(session, 5, 5, 5.5, 40)
    assert session.active_object.choice == 0
    st.choose_candidate(session, 2)
    assert session.active_object.choice == 0, "a box makes the object unambiguous"


# ---- the routes ----------------------------------------------------------------------------------


def test_a_click_answers_one_preview_sized_map_and_downloads_are_the_apis(http):
    picture = png_bytes(2000, 1250, seed=3)
    sid, view = open_session(http, picture)
    assert view["picture"]["preview"] == [1024, 640] and view["picture"]["embedded"]
    view = op(http, sid, op="click", x=600, y=500)
    labels = decode_png(__import__("base64").b64decode(view["map"]))
    assert labels.shape == (640, 1024), "per click, a preview-sized map only"
    assert len(view["thumbnails"]) == 3, "a one-point object offers its candidates"
    view = op(http, sid, op="choose", candidate=1)
    assert view["objects"][0]["candidate"] == 1
    view = op(http, sid, op="settings", hq_only=True)
    mask = http.get(f"/ui/session/{sid}/download/{view['rev']}/mask.png")
    assert mask.status_code == 200
    api = http.post(
        "/v1/images/segmentations",
        json={
            "model": HQ_ID,
            "image_prompt": __import__("base64").b64encode(picture).decode(),
            "segment_prompt": [[[600, 500]]],
            "n": 2,
            "hq_token_only": True,
        },
    ).json()
    assert __import__("base64").b64decode(api["data"][1]["b64_json"]) == mask.content
    snippet = http.get(f"/ui/session/{sid}/download/{view['rev']}/snippet.py").text
    assert "hq_token_only=True" in snippet and "n=2" in snippet and "response.data[1]" in snippet
    stale = http.get(f"/ui/session/{sid}/download/{view['rev'] - 1}/mask.png")
    assert stale.status_code == 409 and "earlier prompt" in stale.json()["error"]["message"]
    objects = http.get(f"/ui/session/{sid}/download/{view['rev']}/objects.json").json()
    assert objects["width"] == 2000 and objects["objects"][0]["rle"]["size"] == [1250, 2000]


def test_a_download_costs_what_the_api_may_and_no_more():
    """The full-size map of a download passes the API's work limit (objects × maps × megapixels)."""
    with LiveServer(build(max_work_mp=2)) as live, httpx.Client(base_url=live.url, timeout=60) as client:
        sid, _ = open_session(client, png_bytes(2000, 1250, seed=5))  # 2.5 megapixels
        view = op(client, sid, op="click", x=600, y=500)
        refused = client.get(f"/ui/session/{sid}/download/{view['rev']}/mask.png")
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "too_much_work"
        assert "object-megapixels" in refused.json()["error"]["message"]
        assert op(client, sid, op="click", x=700, y=520)["map"], "the session still works at preview size"


def test_a_box_only_object_and_a_box_taken_back_over_the_routes(http):
    import base64

    picture = png_bytes(seed=6)
    sid, _ = open_session(http, picture)
    first = op(http, sid, op="click", x=100, y=80)
    boxed = op(http, sid, op="box", x0=20, y0=20, x1=180, y1=150)
    assert boxed["objects"][0]["box"] == [20, 20, 180, 150] and boxed["thumbnails"] == [], "a box: one candidate"
    undone = op(http, sid, op="undo")
    assert undone["objects"][0]["box"] is None and undone["map"] == first["map"], "no stale decode reused"
    op(http, sid, op="new")
    view = op(http, sid, op="box", x0=200, y0=40, x1=300, y1=190)  # Object 2: a box and no point
    assert view["objects"][1]["points"] == [] and view["objects"][1]["value"] == 2
    mask = http.get(f"/ui/session/{sid}/download/{view['rev']}/mask.png").content
    api = http.post(
        "/v1/images/segmentations",
        json={
            "model": HQ_ID,
            "image_prompt": base64.b64encode(picture).decode(),
            "segment_prompt": [[[100, 80]], []],
            "point_labels": [[1], []],
            "box_prompt": [None, [200, 40, 300, 190]],
        },
    ).json()
    assert base64.b64decode(api["data"][0]["b64_json"]) == mask
    response = http.get(f"/ui/session/{sid}/download/{view['rev']}/response.json").json()
    assert response["usage"]["input_tokens_details"]["point_tokens"] == 3
    bad = http.post(f"/ui/session/{sid}/op", json={"op": "box", "x0": 10, "y0": 10, "x1": "a", "y1": 5})
    assert bad.status_code == 400 and "x1 must be a number" in bad.json()["error"]["message"]


def test_pictures_pass_the_apis_limits_and_errors_read_well(http, tmp_path):
    sid, _ = open_session(http)
    bad = http.post(f"/ui/session/{sid}/picture", content=b"not a picture at all")
    assert bad.status_code == 400 and "/tmp" not in bad.text
    bomb = io.BytesIO()
    Image.new("1", (30000, 30000)).save(bomb, "PNG", optimize=True)
    refused = http.post(f"/ui/session/{sid}/picture", content=bomb.getvalue())
    assert refused.status_code == 400 and "megapixel" in refused.json()["error"]["message"]
    assert op_error(http, sid, op="click", x=1, y=1) == 400  # no picture yet
    sid, _ = open_session(http, png_bytes())
    for i in range(64):
        op(http, sid, op="click", x=i, y=i)
    assert op_error(http, sid, op="click", x=1, y=1) == 400, "the API's point limit holds"
    assert http.post(f"/ui/session/{sid}/op", content=b"x" * 5000).status_code == 413
    assert http.post("/ui/session/nope/op", json={"op": "undo"}).status_code == 404
    assert http.post(f"/ui/session/{sid}/picture?example=99").status_code == 400


def op_error(http, sid, **body) -> int:
    return http.post(f"/ui/session/{sid}/op", json=body).status_code


def test_edits_with_numbers_out_of_range_are_a_400_and_the_session_goes_on(http):
    sid, _ = open_session(http, png_bytes())
    for body in (
        {"op": "select", "number": 10**30},
        {"op": "click", "x": 10**400, "y": 5},
        {"op": "click", "x": 1e300, "y": 5},
    ):
        response = http.post(f"/ui/session/{sid}/op", json=body)
        assert response.status_code == 400 and "must be a number" in response.json()["error"]["message"], body
    assert op(http, sid, op="click", x=20, y=30)["map"]


def test_an_edit_announcing_a_large_body_is_refused_before_it_is_read(server):
    from test_security import _raw_headers_only

    status, _ = _raw_headers_only(server, "POST", "/ui/session/anything/op", 2**30)
    assert status == 413


def test_the_admission_gate_bounds_how_many_run_at_once():
    """Each `admit()` holds its own slot: the page and the API both take one per request."""
    import threading

    from segmentation.service import AdmissionGate

    gate, lock, running, peak = AdmissionGate(max_concurrent=2, max_waiting=16), threading.Lock(), [0], [0]
    inside = threading.Barrier(2)

    def work():
        with gate.admit():
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
            try:
                inside.wait(timeout=0.2)  # lets two overlap when they can, never waits long
            except threading.BrokenBarrierError:
                pass
            with lock:
                running[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert peak[0] == 2


def test_examples_load_by_index_never_by_path(http):
    sid, _ = open_session(http)
    view = http.post(f"/ui/session/{sid}/picture?example=1").json()
    assert view["picture"]["name"] == "chelsea.jpg" and view["picture"]["width"] == 451
    assert http.post(f"/ui/session/{sid}/picture?example=../../etc/passwd").status_code == 400


# ---- issue 11 from a stranger's side --------------------------------------------------------------


def queue_call(client: httpx.Client, api_name: str, data: list, timeout: float = 10.0) -> dict:
    """Gradio's own queue protocol: join, then read the session's server-sent events to completion."""
    config = client.get("/config").json()
    fn = next(d["id"] for d in config["dependencies"] if d.get("api_name") == api_name)
    session = "stranger" + str(time.monotonic_ns())
    joined = client.post(
        "/gradio_api/queue/join", json={"data": data, "fn_index": fn, "session_hash": session, "event_data": None}
    )
    assert joined.status_code == 200, joined.text
    with client.stream("GET", "/gradio_api/queue/data", params={"session_hash": session}, timeout=timeout) as events:
        for line in events.iter_lines():
            if line.startswith("data:"):
                message = json.loads(line[5:])
                if message.get("msg") == "process_completed":
                    return message
    raise AssertionError("the event never completed")


@pytest.mark.parametrize("path", ["/dev/zero", "outside.png"])
def test_a_gradio_event_naming_a_server_file_is_refused_at_once(server, tmp_path, path):
    outside = tmp_path / "outside.png"
    outside.write_bytes(png_bytes(40, 30))
    target = str(outside) if path == "outside.png" else path
    crafted = {"path": target, "meta": {"_type": "gradio.FileData"}, "orig_name": "x.png"}
    with httpx.Client(base_url=server.url, timeout=10) as client:
        started = time.monotonic()
        message = queue_call(client, "segment", [crafted, [[[1, 1]]], None, "", 1])
        assert time.monotonic() - started < 5
        assert message["success"] is False and "not uploaded here" in json.dumps(message)
        started = time.monotonic()
        assert client.get("/v1/models").status_code == 200 and time.monotonic() - started < 1
        served = client.get(f"/gradio_api/file={target}")
        assert served.status_code != 200 or served.content != outside.read_bytes()
        for cached in Path(__import__("gradio").utils.get_upload_folder()).rglob("outside.png"):
            pytest.fail(f"the file was copied into Gradio's cache: {cached}")


def test_with_api_keys_gradio_exposes_no_segment_endpoint():
    from fastapi.testclient import TestClient

    with TestClient(build()) as client:
        assert "/segment" in client.get("/gradio_api/info").json()["named_endpoints"]
    with TestClient(build(api_keys=("k",))) as client:
        assert "/segment" not in client.get("/gradio_api/info").json()["named_endpoints"]
        assert client.get("/").status_code == 200


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


def test_sessions_hold_no_pixels_expire_and_keep_disk_bounded(monkeypatch):
    monkeypatch.setenv("SAMHQ_UI_SESSIONS", "5")
    monkeypatch.setenv("SAMHQ_UI_SESSION_TTL", "3600")
    application = build()
    store = application.state.page.store
    store.recent = 0.0  # sessions idle for any time may make room (tests/test_sessions_public.py: the recent rule)
    picture = png_bytes(2400, 1600, seed=9)  # 3.8 MP: the old state kept ~60 MB of it per session
    with LiveServer(application) as live, httpx.Client(base_url=live.url, timeout=60) as http:
        open_session(http, picture)  # warm: the embedding is cached once for all
        gc.collect()
        before = _rss()
        sids = []
        for _ in range(20):
            sid, _ = open_session(http, picture)
            op(http, sid, op="click", x=100, y=100)
            http.get(f"/ui/session/{sid}/download/{op(http, sid, op='undo')['rev']}/mask.png")
            sids.append(sid)
        gc.collect()
        grown = _rss() - before
        assert len(store) <= 5 and len(list(store.root.iterdir())) <= 5, "a capacity, with the folders"
        assert grown < 200 * 2**20, f"20 sessions on a 3.8 MP picture grew RSS by {grown / 2**20:.0f} MiB"
        entry = store.get(sids[-1])
        assert entry is not None and len(pickle.dumps(entry.session)) < 4000
        decodes = application.state.page.backend.decodes  # the sessions' kept decodes: one bounded cache
        assert 0 < decodes.nbytes <= decodes.max_bytes
        assert http.post(f"/ui/session/{sids[0]}/op", json={"op": "undo"}).status_code == 404
        http.delete(f"/ui/session/{sids[-1]}")
        assert not entry.folder.exists(), "a closed session's folder and downloads go with it"
        store.ttl = 0.0
        store.get("anything")  # any visit expires idle sessions
        assert len(store) == 0 and not any(store.root.iterdir())


def test_gradio_uploads_are_closed_and_its_cache_is_cleaned(monkeypatch):
    import gradio

    monkeypatch.setenv("SAMHQ_UI_CACHE_AGE", "2")
    application = build()
    with LiveServer(application) as live, httpx.Client(base_url=live.url, timeout=30) as http:
        before = set(Path(gradio.utils.get_upload_folder()).rglob("*"))
        for path in ("/gradio_api/upload", "/gradio_api/upload/", "/gradio_api/process_recording"):
            refused = http.post(path, files={"files": ("a.png", png_bytes(20, 20))})
            assert refused.status_code == 403, refused.text
        assert set(Path(gradio.utils.get_upload_folder()).rglob("*")) <= before, "nothing was stored"
    blocks = next(route.app for route in application.routes if hasattr(route, "app") and hasattr(route.app, "blocks"))
    assert blocks.get_blocks().delete_cache == (1, 2), "what Gradio does store is deleted after SAMHQ_UI_CACHE_AGE"


def test_the_offline_banner_names_the_model_and_the_fix():
    from fastapi.testclient import TestClient

    missing = "syscv-community/sam-hq-vit-large"
    application = app.build_app(Settings(model=missing, preload_examples=False, device="cpu"))
    with TestClient(application) as client:
        sid = client.post("/ui/session").json()["session"]
        started = time.monotonic()
        first = client.post(f"/ui/session/{sid}/picture?example=0")
        assert first.status_code == 503 and first.json()["banner"]["model"] == missing
        second = client.post(f"/ui/session/{sid}/picture?example=0")
        assert second.status_code == 503 and time.monotonic() - started < 10
        config = client.post("/ui/session").json()
        assert f"hf download {missing}" in config["banner"]["fix"] and "HF_HUB_OFFLINE=1" in config["banner"]["fix"]


def test_settings_from_flags_override_the_environment(monkeypatch):
    monkeypatch.setenv("SAMHQ_MODEL", "facebook/sam-vit-base")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7999")
    monkeypatch.setenv("SAMHQ_THREADS", "8")
    flags = ["--model", HQ_ID, "--models", "facebook/sam-vit-base", "--cache-mb", "64", "--no-preload"]
    settings = app.settings_from(app.parse_args([*flags, "--threads", "1"]))
    assert settings.model == HQ_ID and settings.served_models == (HQ_ID, "facebook/sam-vit-base")
    assert settings.cache_mb == 64 and not settings.preload_examples and settings.threads == 1
    args = app.parse_args([])
    assert args.port == 7999 and args.host == "127.0.0.1"


def test_spaces_gpu_decorator_applies_only_on_zerogpu(monkeypatch):
    import sys
    import types

    def handler():
        return 1

    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    assert app._spaces_gpu(handler) is handler
    fake = types.ModuleType("spaces")
    fake.GPU = lambda fn: ("wrapped", fn)
    monkeypatch.setitem(sys.modules, "spaces", fake)
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    assert app._spaces_gpu(handler) == ("wrapped", handler)


def test_the_use_via_api_function():
    from api_fixtures import png_b64
    from gradio import Error

    from segmentation.service import ModelRegistry
    from ui.page import api_segment_function

    settings = Settings(model=HQ_ID, preload_examples=False, device="cpu")
    segment = api_segment_function(ModelRegistry(settings))
    assert len(segment(png_b64(), [[[10, 10]], [[100, 50]]], None, "", 2)["data"]) == 2
    with pytest.raises(Error, match="outside"):
        segment(png_b64(), [[[1000, 10]]])


def test_the_file_rule_resolves_links_and_refuses_devices_and_urls(tmp_path):
    from ui.guard import allowed_file

    inside = tmp_path / "uploads"
    inside.mkdir()
    (inside / "a.png").write_bytes(b"x")
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"y")
    (inside / "link.png").symlink_to(secret)
    assert allowed_file(inside / "a.png", [inside])
    assert not allowed_file(inside / "link.png", [inside]), "a link out of the folder is outside"
    assert not allowed_file(str(inside / ".." / "secret.png"), [inside])
    assert not allowed_file("/dev/zero", ["/dev"]), "only regular files"
    assert not allowed_file("http://127.0.0.1/a.png", [inside]) and not allowed_file(inside, [inside])
