"""UI event handlers in Python: state transitions, sessions, candidates, stale results, errors, exports."""

from __future__ import annotations

import json
import pickle
import threading
import time
from types import SimpleNamespace

import gradio as gr
import numpy as np
import pytest
from conftest import HQ_ID, make_picture
from PIL import Image

import app
from segmentation.masks import decode_png
from segmentation.service import ModelRegistry
from segmentation.settings import Settings


@pytest.fixture(scope="module")
def ui():
    settings = Settings(model=HQ_ID, preload_examples=False, device="cpu")
    return app.SegmentationUI(ModelRegistry(settings), settings)


@pytest.fixture
def loaded(ui, tmp_path):
    path = tmp_path / "p.png"
    Image.fromarray(make_picture(320, 200, seed=4)).save(path)
    outputs = ui.load_picture(str(path), app.new_state(HQ_ID), progress=lambda *a, **k: None)
    return outputs[-2]


def click(ui, state, x, y, mode=app.INCLUDE):
    return ui.click(state, mode, False, 0.5, SimpleNamespace(index=[x, y]))


def test_state_transitions():
    state = app.new_state("m")
    app.add_point(state, 1, 2, True)
    app.add_point(state, 3, 4, False)
    assert state["objects"][0] == {"points": [[1, 2], [3, 4]], "labels": [1, 0], "choice": 0}
    app.start_new_object(state)
    assert state["active"] == 1 and len(state["objects"]) == 2
    app.start_new_object(state)  # the active object is still empty: no pile of empty objects
    assert len(state["objects"]) == 2
    app.add_point(state, 5, 6, True)
    app.select_object(state, "Object 1")
    assert state["active"] == 0
    app.undo_point(state)
    assert state["objects"][0]["points"] == [[1, 2]]
    app.clear_object(state)
    assert state["objects"][0]["points"] == [] and state["objects"][1]["points"] == [[5, 6]]
    app.select_object(state, "Object 2")
    app.choose_candidate(state, 2)
    assert state["objects"][1]["choice"] == 2
    app.add_point(state, 7, 8, True)
    assert state["objects"][1]["choice"] == 0, "a new point resets the chosen candidate"
    app.clear_all(state)
    assert state["objects"] == [{"points": [], "labels": [], "choice": 0}] and state["active"] == 0


def test_undo_on_an_empty_new_object_returns_to_the_previous_one():
    state = app.new_state("m")
    app.add_point(state, 1, 1, True)
    app.start_new_object(state)
    app.undo_point(state)
    assert len(state["objects"]) == 1 and state["active"] == 0


def test_load_picture_embeds_at_once(ui, loaded):
    assert loaded["key"] and loaded["rgb"].shape == (200, 320, 3)
    assert ui.registry.get().cached(loaded["key"]) is not None


def test_clicks_segment_two_objects_with_the_engine_label_map(ui, loaded):
    outputs = click(ui, loaded, 96, 80)
    canvas, overlay, mask, cut, legend, gallery, selector, state, status = outputs
    assert overlay.shape == (200, 320, 3) and cut.shape == (200, 320, 4)
    assert len(gallery) == 3, "a single-point object offers three candidates"
    assert "1 object(s)" in status and "cached" in status
    app.start_new_object(state)
    outputs = click(ui, state, 224, 120, app.EXCLUDE)
    state = outputs[-2]
    assert state["objects"][1]["labels"] == [0]
    labels = state["result"]["map"].labels
    segmenter = ui.registry.get()
    expected = segmenter.segment(
        segmenter.embed(make_picture(320, 200, seed=4)), [[[96, 80]], [[224, 120]]], [[1], [0]]
    )
    np.testing.assert_array_equal(labels, expected.best.labels)
    assert "Object 2 (active)" in outputs[4]


def test_choosing_a_candidate_changes_only_the_active_object(ui, loaded):
    state = click(ui, loaded, 96, 80)[-2]
    app.start_new_object(state)
    state = click(ui, state, 224, 120)[-2]
    app.select_object(state, "Object 1")
    outputs = ui.choose(state, False, 0.5, SimpleNamespace(index=2))
    state = outputs[-2]
    assert [o.candidate for o in state["result"]["map"].objects] == [2, 0]
    assert "3 of 3" in outputs[4]


def test_the_same_prompt_is_never_decoded_twice(ui, loaded, monkeypatch):
    from segmentation import decoder

    state = click(ui, loaded, 96, 80)[-2]
    app.start_new_object(state)
    state = click(ui, state, 224, 120)[-2]
    decodes = []
    original = decoder.decode
    monkeypatch.setattr(decoder, "decode", lambda *a, **k: decodes.append(1) or original(*a, **k))
    app.select_object(state, "Object 1")
    outputs = ui.choose(state, False, 0.5, SimpleNamespace(index=1))  # another candidate
    outputs = ui.edit(lambda s: s)(outputs[-2], False, 0.8)  # another opacity
    assert decodes == [] and "reused" in outputs[-1]
    state = outputs[-2]
    # the kept decode lives in host memory: no GPU memory per session, and the state pickles (ZeroGPU)
    assert state["decoded"].logits.device.type == "cpu"
    pickle.loads(pickle.dumps(state))
    segmenter = ui.registry.get()
    fresh = segmenter.segment(segmenter.cached(state["key"]), [[[96, 80]], [[224, 120]]], choices=[[1, 0]])
    np.testing.assert_array_equal(state["result"]["map"].labels, fresh.best.labels)
    decodes.clear()
    ui.edit(lambda s: s)(state, True, 0.8)  # HQ token only: a different decode
    assert len(decodes) == 1


def test_sessions_are_independent(ui, tmp_path):
    path = tmp_path / "q.png"
    Image.fromarray(make_picture(160, 100, seed=8)).save(path)
    first = ui.load_picture(str(path), app.new_state(HQ_ID), progress=lambda *a, **k: None)[-2]
    second = ui.load_picture(str(path), app.new_state(HQ_ID), progress=lambda *a, **k: None)[-2]
    click(ui, first, 10, 10)
    assert second["objects"][0]["points"] == []
    assert app.new_state(HQ_ID)["objects"][0]["points"] == []


def test_stale_results_never_overwrite_a_newer_click(ui, loaded, monkeypatch):
    original = ui._render
    gate = threading.Event()

    def slow_first(state, hq, opacity):
        if not gate.is_set():
            gate.set()
            time.sleep(0.5)
        return original(state, hq, opacity)

    monkeypatch.setattr(ui, "_render", slow_first)
    results = {}
    first = threading.Thread(target=lambda: results.setdefault("first", click(ui, loaded, 40, 40)))
    first.start()
    gate.wait(5)
    results["second"] = click(ui, loaded, 100, 100)
    first.join()
    skip = gr.skip()
    assert all(output == skip for output in results["first"]), "the older click's result is dropped"
    assert results["second"][-2] is loaded and results["second"][1] is not None


def test_click_without_a_picture_is_a_readable_error(ui):
    with pytest.raises(gr.Error, match="Upload a picture first"):
        click(ui, app.new_state(HQ_ID), 1, 1)


def test_bad_upload_and_unloadable_model_are_readable_errors(ui, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a picture at all")
    with pytest.raises(gr.Error, match="not a picture"):
        ui.load_picture(str(bad), app.new_state(HQ_ID), progress=lambda *a, **k: None)
    settings = Settings(model="syscv-community/sam-hq-vit-large", preload_examples=False, device="cpu")
    offline = app.SegmentationUI(ModelRegistry(settings), settings)
    with pytest.raises(gr.Error, match="could not be loaded"):
        offline.load_picture(str(bad), app.new_state(settings.model), progress=lambda *a, **k: None)
    assert "unavailable" in offline.startup_status()


def test_export_writes_the_api_bytes_rle_polygons_and_snippet(ui, loaded):
    state = click(ui, loaded, 96, 80)[-2]
    with pytest.raises(gr.Error, match="Nothing to export"):
        ui.export(app.new_state(HQ_ID))
    mask_path, objects_path, response_path, snippet = ui.export(state)
    labels = decode_png(open(mask_path, "rb").read())
    np.testing.assert_array_equal(labels, state["result"]["map"].labels)
    objects = json.load(open(objects_path))
    assert objects["width"] == 320 and objects["objects"][0]["rle"]["size"] == [200, 320]
    response = json.load(open(response_path))
    assert set(response) == {"created", "data", "usage"} and response["data"][0]["segments"][0]["value"] == 1
    assert "images.segment(" in snippet and "[[[96.0, 80.0]]]" in snippet


def test_the_use_via_api_endpoint(ui):
    from api_fixtures import png_b64

    payload = ui.api_segment(png_b64(), [[[10, 10]], [[100, 50]]], None, "", 2)
    assert len(payload["data"]) == 2
    with pytest.raises(gr.Error, match="outside"):
        ui.api_segment(png_b64(), [[[1000, 10]]])


def test_settings_from_flags_override_the_environment(monkeypatch):
    monkeypatch.setenv("SAMHQ_MODEL", "facebook/sam-vit-base")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7999")
    monkeypatch.setenv("SAMHQ_THREADS", "8")
    flags = [
        "--model",
        HQ_ID,
        "--models",
        "facebook/sam-vit-base",
        "--cache-mb",
        "64",
        "--no-preload",
        "--threads",
        "1",
    ]
    settings = app.settings_from(app.parse_args(flags))
    assert settings.model == HQ_ID and settings.served_models == (HQ_ID, "facebook/sam-vit-base")
    assert settings.cache_mb == 64 and not settings.preload_examples and settings.threads == 1
    args = app.parse_args([])
    assert args.port == 7999 and args.host == "127.0.0.1"


def test_app_serves_ui_and_api_on_one_port():
    from fastapi.testclient import TestClient

    settings = Settings(model=HQ_ID, preload_examples=False, device="cpu")
    with TestClient(app.build_app(settings)) as client:
        assert client.get("/").status_code == 200
        assert client.get("/v1/models").json()["data"][0]["id"] == HQ_ID
        assert "/segment" in client.get("/gradio_api/info").json()["named_endpoints"]


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


def test_a_decompression_bomb_upload_is_refused_before_decoding(ui, tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (30000, 30000)).save(bomb, optimize=True)
    with pytest.raises(gr.Error, match="megapixel limit"):
        ui.load_picture(str(bomb), app.new_state(HQ_ID), progress=lambda *a, **k: None)


def test_the_canvas_hands_over_uploads_undecoded(ui):
    demo = ui.build()
    canvas = next(block for block in demo.blocks.values() if getattr(block, "elem_id", None) == "canvas")
    assert canvas.type == "filepath" and canvas.image_mode is None


def test_changing_the_model_re_embeds_the_session_picture(tmp_path):
    from conftest import SAM_ID

    settings = Settings(model=HQ_ID, models=(HQ_ID, SAM_ID), preload_examples=False, device="cpu")
    ui = app.SegmentationUI(ModelRegistry(settings), settings)
    path = tmp_path / "m.png"
    Image.fromarray(make_picture(120, 80, seed=6)).save(path)
    state = ui.load_picture(str(path), app.new_state(HQ_ID), progress=lambda *a, **k: None)[-2]
    hq_key = state["key"]
    canvas, state, status = ui.change_model(SAM_ID, state, progress=lambda *a, **k: None)
    assert state["model"] == SAM_ID and state["key"] != hq_key and SAM_ID in status
    state = click(ui, state, 30, 30)[-2]
    assert state["result"]["map"].labels.shape == (80, 120)
    with pytest.raises(gr.Error, match="not served"):
        ui.change_model("someone/else", state, progress=lambda *a, **k: None)
