"""Issue 21 row 4 from the outside: an edit through the page's /ui routes costs the objects it changes.

A live server on the tiny checkpoint, driven over raw HTTP as the browser does; a forward hook on the mask
decoder counts the objects each request decodes. Maps stay those of a decode of the whole prompt."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
import torch
from conftest import HQ_ID, make_picture
from live_server import LiveServer
from PIL import Image

import app
from segmentation.masks import compose_label_map, decode_png, to_numpy_labels
from segmentation.settings import Settings

WIDTH, HEIGHT = 320, 200
OBJECTS = 16


def png_bytes(seed=11) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(make_picture(WIDTH, HEIGHT, seed=seed)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server():
    settings = Settings(model=HQ_ID, preload_examples=False, device="cpu", max_points=4, max_objects=OBJECTS)
    application = app.build_app(settings)
    segmenter = application.state.registry.get()
    decoded: list[int] = []  # objects per decoder call
    hook = segmenter.model.mask_decoder.transformer.final_attn_token_to_image.register_forward_hook(
        lambda m, args, kwargs, out: decoded.append(out[0].shape[1]), with_kwargs=True
    )
    try:
        with LiveServer(application) as live:
            live.segmenter, live.decoded = segmenter, decoded
            yield live
    finally:
        hook.remove()


def op(http, sid, **body) -> dict:
    response = http.post(f"/ui/session/{sid}/op", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def counted(server, http, sid, **body) -> tuple[dict, int]:
    """The view after the edit, and how many objects the decoder ran for it."""
    before = len(server.decoded)
    view = op(http, sid, **body)
    return view, sum(server.decoded[before:])


def whole_prompt_preview(server, picture: bytes, view: dict) -> np.ndarray:
    """The preview map of a decode of the whole prompt at once (what every edit used to do)."""
    segmenter = server.segmenter
    embedding = segmenter.embed(picture)
    prompted = [o for o in view["objects"] if o["value"] is not None]
    decoded = segmenter.decode(
        embedding, [o["points"] for o in prompted], [o["labels"] for o in prompted], [o["box"] for o in prompted]
    )
    plan = torch.as_tensor([o["choice"] for o in prompted])
    chosen = decoded.logits.float()[torch.arange(len(prompted)), plan]
    width, height = view["picture"]["preview"]
    return to_numpy_labels(compose_label_map(chosen, embedding.resized_size, (height, width)), len(prompted))


def test_an_edit_decodes_only_the_objects_it_changes_and_maps_stay_a_whole_decodes(server):
    picture = png_bytes()
    with httpx.Client(base_url=server.url, timeout=120) as http:
        sid = http.post("/ui/session").json()["session"]
        assert http.post(f"/ui/session/{sid}/picture", content=picture).status_code == 200
        op(http, sid, op="embed")
        for i in range(OBJECTS):
            if i:
                op(http, sid, op="new")
            x, y = 12 + 19 * i, 30 + 9 * (i % 12)
            view, decoded = counted(server, http, sid, op="click", x=x, y=y)
            assert decoded == 1, f"object {i + 1}'s click decoded {decoded} objects"
        view, decoded = counted(server, http, sid, op="select", number=3)
        assert decoded == 0 and view["active"] == 3, "a no-op select decodes nothing"
        assert len(view["thumbnails"]) == 3, "the one-point object's candidates, from what was kept"
        view, decoded = counted(server, http, sid, op="click", x=60, y=120, include=False)
        assert decoded == 1, f"a one-point edit on {OBJECTS} objects decoded {decoded}"
        np.testing.assert_array_equal(
            decode_png(base64.b64decode(view["map"])), whole_prompt_preview(server, picture, view)
        )
        view, decoded = counted(server, http, sid, op="select", number=5)
        view, chose = counted(server, http, sid, op="choose", candidate=2)
        assert decoded == chose == 0 and view["objects"][4]["candidate"] == 2
        np.testing.assert_array_equal(
            decode_png(base64.b64decode(view["map"])), whole_prompt_preview(server, picture, view)
        )
        view, decoded = counted(server, http, sid, op="box", x0=150, y0=20, x1=260, y1=150)
        assert decoded == 1
        _, decoded = counted(server, http, sid, op="undo")
        assert decoded == 0, "undo brings back a prompt whose decode is kept"
        view, _ = counted(server, http, sid, op="redo")
        mask = http.get(f"/ui/session/{sid}/download/{view['rev']}/mask.png")
        assert mask.status_code == 200
        prompted = [o for o in view["objects"] if o["value"] is not None]
        api = http.post(
            "/v1/images/segmentations",
            json={
                "model": HQ_ID,
                "image_prompt": base64.b64encode(picture).decode(),
                "segment_prompt": [o["points"] for o in prompted],
                "point_labels": [o["labels"] for o in prompted],
                "box_prompt": [o["box"] for o in prompted],
            },
        ).json()
        assert base64.b64decode(api["data"][0]["b64_json"]) == mask.content, "the API's map for the whole prompt"


def test_an_edit_over_a_limit_is_refused_before_it_is_stored(server):
    with httpx.Client(base_url=server.url, timeout=120) as http:
        sid = http.post("/ui/session").json()["session"]
        assert http.post(f"/ui/session/{sid}/picture", content=png_bytes(seed=12)).status_code == 200
        op(http, sid, op="embed")
        for i in range(4):
            view = op(http, sid, op="click", x=20 + 10 * i, y=40)
        rev = view["rev"]
        before = len(server.decoded)
        refused = http.post(f"/ui/session/{sid}/op", json={"op": "click", "x": 100, "y": 100})
        assert refused.status_code == 400 and "the limit is 4" in refused.json()["error"]["message"]
        assert len(server.decoded) == before, "nothing was decoded for a refused edit"
        view = op(http, sid, op="undo")
        assert view["objects"][0]["points"] == [[20, 40], [30, 40], [40, 40]], "one undo takes back the 4th point"
        assert view["rev"] == rev + 1
        for i in range(OBJECTS - 1):
            op(http, sid, op="new")
            op(http, sid, op="click", x=5 + 15 * i, y=150)
        op(http, sid, op="new")
        refused = http.post(f"/ui/session/{sid}/op", json={"op": "box", "x0": 1, "y0": 1, "x1": 50, "y1": 50})
        assert refused.status_code == 400 and f"the limit is {OBJECTS}" in refused.json()["error"]["message"]
        view = op(http, sid, op="select", number=view["active"])
        assert sum(o["value"] is not None for o in view["objects"]) == OBJECTS and view["objects"][-1]["box"] is None


# ---- the pieces, in process -------------------------------------------------------------------------


def test_a_decode_put_back_together_from_its_parts_composes_the_same_maps(segmenter, picture):
    from segmentation.engine import Decoded
    from segmentation.masks import compose_upscaled, positive_window
    from segmentation.prompts import Prompt

    embedding = segmenter.embed(picture)
    points = [[[40, 50]], [[100, 60], [120, 90]], [], [[250, 120]]]
    labels = [[1], [1, 0], [], [1]]
    boxes = [None, None, [150, 20, 300, 180], None]
    whole = segmenter.decode(embedding, points, labels, boxes)
    alone = [segmenter.decode(embedding, Prompt(objects=(obj,))).part(0) for obj in whole.prompt.objects]
    assert [part.logits.shape[0] for part in alone] == [3, 1, 1, 3], "one candidate kept unless ambiguous"
    rebuilt = Decoded.from_parts(embedding.key, whole.prompt, False, alone)
    assert rebuilt.counts == whole.counts
    for choices in ([[0, 0, 0, 0]], [[2, 0, 0, 1]]):
        a = segmenter.compose(embedding, rebuilt, choices=choices).best
        b = segmenter.compose(embedding, whole, choices=choices).best
        np.testing.assert_array_equal(a.labels, b.labels)
        # an object decoded alone or beside others of its layout differs only by float rounding (as max_batch)
        assert [(o.value, o.area, o.bbox, o.candidate) for o in a.objects] == [
            (o.value, o.area, o.bbox, o.candidate) for o in b.objects
        ]
        np.testing.assert_allclose([o.score for o in a.objects], [o.score for o in b.objects], rtol=1e-4)
    from segmentation.decoder import upscale_logits

    logits = whole.logits[:, 0].float()
    logits[3] = logits[0]  # exact ties: the earlier object keeps the pixel
    logits[2] = -logits[2].abs() - 1  # an object that claims nothing
    logits[1, :, :128] = -5  # one that claims only part of the map: a window
    size = (90, 140)
    windows = [positive_window(upscale_logits(logits[i : i + 1], embedding.resized_size, size)[0]) for i in range(4)]
    assert windows[2] is None and windows[1][2].shape[1] < size[1]
    expected = compose_label_map(logits, embedding.resized_size, size).numpy()
    np.testing.assert_array_equal(compose_upscaled(iter(windows), 4, size).numpy(), expected)
    assert 3 not in expected and 4 not in expected, "claims nothing; ties with object 1 everywhere"


def test_the_decode_cache_stays_within_its_bytes_and_keeps_what_a_request_uses():
    from ui.backend import DecodeCache

    cache = DecodeCache(max_bytes=1000)
    first = cache.request()
    assert all(cache.put(("a", i), i, 300, first) for i in range(3))
    assert not cache.put(("a", 3), 3, 300, first), "a request never evicts what it uses itself"
    assert cache.nbytes == 900 and cache.get(("a", 0), first) == 0
    second = cache.request()
    assert cache.get(("a", 2), second) == 2
    assert cache.put(("b", 0), "b", 300, second) and cache.nbytes <= 1000
    assert cache.get(("a", 1), second) is None, "the least recently used entry of an older request went"
    assert not cache.put(("huge",), "x", 5000, cache.request()) and cache.nbytes <= 1000
