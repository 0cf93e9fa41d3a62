"""The page's Everything routes from the outside (raw HTTP against a live app): a run with progress, its
objects as ordinary page objects (the page's own map equals the API's everything map; refine, delete, numbers
kept), Cancel, bad knobs, and a click answered while a run goes on after at most one batch."""

from __future__ import annotations

import base64
import io
import time

import httpx
import numpy as np
import pytest
from conftest import HQ_ID, make_picture
from live_server import LiveServer
from PIL import Image

from segmentation.everything import generate
from segmentation.everything_options import EverythingOptions
from segmentation.service import everything_result

KNOBS = {"points_per_side": 5, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.05, "box_nms_thresh": 1.0}


@pytest.fixture(scope="module")
def server():
    import app as app_module
    from segmentation.settings import Settings

    with LiveServer(app_module.build_app(Settings(model=HQ_ID, preload_examples=False, device="cpu"))) as live:
        yield live


@pytest.fixture(scope="module")
def picture() -> np.ndarray:
    return make_picture(200, 140, seed=8)


def _session(server, picture) -> tuple[httpx.Client, str]:
    http = httpx.Client(base_url=server.url, timeout=120)
    sid = http.post("/ui/session").json()["session"]
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    assert http.post(f"/ui/session/{sid}/picture", content=buffer.getvalue()).status_code == 200
    assert http.post(f"/ui/session/{sid}/op", json={"op": "embed"}).status_code == 200
    return http, sid


def _wait(http, sid, until, deadline=120.0) -> dict:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        status = http.get(f"/ui/session/{sid}/everything").json()
        if until(status):
            return status
        time.sleep(0.05)
    raise AssertionError(f"timed out; last status {status}")


def _map(view) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(view["map"]))))


def test_found_objects_are_page_objects_showing_the_apis_map(server, picture, segmenter):
    http, sid = _session(server, picture)
    started = http.post(f"/ui/session/{sid}/everything", json=KNOBS).json()
    assert started["state"] == "running" and started["total"] == 1
    status = _wait(http, sid, lambda s: s["state"] != "running")
    assert status["state"] == "finished" and status["done"] == status["total"]
    view = http.post(f"/ui/session/{sid}/everything/apply").json()
    embedding = segmenter.embed(picture)
    found = generate(segmenter, embedding, EverythingOptions(**KNOBS))
    expected = everything_result(segmenter, embedding, True, found, None, {}).candidates[0].labels
    assert len(view["objects"]) == len(found.masks) >= 2
    assert [o["number"] for o in view["objects"]] == list(range(2, 2 + len(found.masks)))  # Object 1 was empty
    assert all(len(o["points"]) == 1 and o["labels"] == [1] for o in view["objects"])
    shown = _map(view)
    assert shown.shape == expected.shape
    assert np.mean(shown == expected) >= 0.999  # the page's own decode reproduces the masks the generator kept
    assert "Everything found" in view["status"]
    # a found object is an ordinary object: refine it with a point and a box, delete another; numbers stay
    second = view["objects"][1]["number"]
    http.post(f"/ui/session/{sid}/op", json={"op": "select", "number": second})
    view = http.post(f"/ui/session/{sid}/op", json={"op": "click", "x": 20, "y": 20, "include": False}).json()
    view = http.post(f"/ui/session/{sid}/op", json={"op": "box", "x0": 5, "y0": 5, "x1": 150, "y1": 120}).json()
    refined = next(o for o in view["objects"] if o["number"] == second)
    assert len(refined["points"]) == 2 and refined["box"] == [5, 5, 150, 120] and refined["value"] == 2
    http.post(f"/ui/session/{sid}/op", json={"op": "select", "number": view["objects"][0]["number"]})
    view = http.post(f"/ui/session/{sid}/op", json={"op": "delete"}).json()
    assert [o["number"] for o in view["objects"]] == list(range(3, 2 + len(found.masks)))
    # applied once
    assert http.post(f"/ui/session/{sid}/everything/apply").status_code == 400


def test_cancel_stops_after_the_current_batch_and_bad_knobs_are_400(server, picture):
    http, sid = _session(server, picture)
    bad = http.post(f"/ui/session/{sid}/everything", json={"points_per_side": 0})
    assert bad.status_code == 400 and "points_per_side" in bad.json()["error"]["message"]
    bad = http.post(f"/ui/session/{sid}/everything", json={"pred_iou": 0.5})
    assert bad.status_code == 400 and "unknown" in bad.json()["error"]["message"]
    bad = http.post(f"/ui/session/{sid}/everything", json={"min_mask_region_area": 50})  # the page keeps decodes
    assert bad.status_code == 400 and "min_mask_region_area" in bad.json()["error"]["message"]
    started = http.post(f"/ui/session/{sid}/everything", json={**KNOBS, "points_per_side": 12, "points_per_batch": 4})
    assert started.json()["total"] == 36
    _wait(http, sid, lambda s: s["done"] >= 1)
    again = http.post(f"/ui/session/{sid}/everything", json=KNOBS)
    assert again.status_code == 400 and "already running" in again.json()["error"]["message"]
    http.delete(f"/ui/session/{sid}/everything")
    status = _wait(http, sid, lambda s: s["state"] != "running")
    assert status["state"] == "cancelled" and status["done"] < 36
    assert http.post(f"/ui/session/{sid}/everything/apply").status_code == 400


def test_a_click_during_a_run_is_answered_before_it_ends_after_at_most_one_batch(server, picture):
    http, sid = _session(server, picture)
    other, other_sid = _session(server, make_picture(120, 90, seed=9))  # another visitor
    http.post(f"/ui/session/{sid}/everything", json={**KNOBS, "points_per_side": 10, "points_per_batch": 5})
    _wait(http, sid, lambda s: s["done"] >= 1)
    for x in (30, 60, 90):
        before = http.get(f"/ui/session/{sid}/everything").json()
        if before["done"] >= before["total"] - 1:
            break
        answer = other.post(f"/ui/session/{other_sid}/op", json={"op": "click", "x": x, "y": 40, "include": True})
        after = http.get(f"/ui/session/{sid}/everything").json()
        assert answer.status_code == 200 and answer.json()["objects"][0]["points"][-1] == [x, 40]
        assert after["state"] == "running", "the click waited for the whole run"
        assert after["done"] - before["done"] <= 1, f"the click waited {after['done'] - before['done']} batches"
    http.delete(f"/ui/session/{sid}/everything")
    _wait(http, sid, lambda s: s["state"] != "running")


def test_found_objects_pass_the_object_limit_runs_are_bounded_and_a_closed_pages_run_stops(picture):
    """Applying a run is an edit like any other: past the object limit only the best found objects are added
    (said in the status), never stored and then refused. At most `MAX_RUNNING` runs go at once (429 past it),
    and a run whose page was closed stops before its next batch."""
    import app as app_module
    from segmentation.settings import Settings

    application = app_module.build_app(Settings(model=HQ_ID, preload_examples=False, device="cpu", max_objects=2))
    jobs = application.state.page.everything
    with LiveServer(application) as live:
        http, sid = _session(live, picture)
        assert http.post(f"/ui/session/{sid}/op", json={"op": "click", "x": 20, "y": 20}).status_code == 200
        http.post(f"/ui/session/{sid}/everything", json=KNOBS)
        assert _wait(http, sid, lambda s: s["state"] != "running")["found"] >= 2
        view = http.post(f"/ui/session/{sid}/everything/apply").json()
        assert [len(o["points"]) for o in view["objects"] if o["value"]] == [1, 1]  # the click and the best found
        assert "the 1 best: a picture holds at most 2 objects" in view["status"]

        jobs.MAX_RUNNING = 1
        other_http, other = _session(live, picture)
        long_run = {**KNOBS, "points_per_side": 32, "points_per_batch": 8}
        assert other_http.post(f"/ui/session/{other}/everything", json=long_run).json()["state"] == "running"
        refused = http.post(f"/ui/session/{sid}/everything", json=KNOBS)
        assert refused.status_code == 429 and "other visitors" in refused.json()["error"]["message"]
        job = jobs.jobs[other]
        other_http.delete(f"/ui/session/{other}")  # the tab is closed: nobody will read the result
        job.thread.join(timeout=120)
        assert not job.thread.is_alive() and job.state == "cancelled" and job.done < job.options.batches
