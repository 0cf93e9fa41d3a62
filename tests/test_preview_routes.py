"""Issue 19 part 2, the hover preview's routes, as the browser meets them: raw HTTP against a live server of the
real app. The features decode back to the engine's tensors within float16 precision, files are immutable under
their URL (ETag, 304), a stranger's or a stale session/picture is a 404, the bytes and streams bounds hold,
and the graphs served (decoder and picture graph) are ones onnxruntime loads and runs together."""

from __future__ import annotations

import io
import time

import httpx
import numpy as np
import pytest
from conftest import HQ_ID, make_picture
from live_server import LiveServer
from PIL import Image

import app
from segmentation.settings import Settings
from ui.preview_routes import RUNTIME_VERSION, unpack_features


def png_bytes(width=96, height=64, seed=4) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(make_picture(width, height, seed=seed)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SAMHQ_UI_SESSIONS_DIR", str(tmp_path_factory.mktemp("sessions")))
        env.setenv("SAMHQ_UI_PREVIEW_GRAPH", "sam")  # the page's own test (test_preview_browser.py) has the default hq
        application = app.build_app(Settings(model=HQ_ID, preload_examples=False, device="cpu"))
    with LiveServer(application) as live, httpx.Client(base_url=live.url, timeout=120) as http:
        yield live, application, http


def ready_session(http: httpx.Client, picture: bytes) -> tuple[str, dict]:
    """A session with an embedded picture, and its preview info once the graph is built (polled, deadline)."""
    sid = http.post("/ui/session").json()["session"]
    assert http.post(f"/ui/session/{sid}/picture", content=picture).status_code == 200
    assert http.post(f"/ui/session/{sid}/op", json={"op": "embed"}).status_code == 200
    deadline = time.monotonic() + 180
    while True:
        info = http.get(f"/ui/session/{sid}/preview?prepare=1").json()
        if info["state"] == "ready" or time.monotonic() > deadline:
            return sid, info
        assert info["state"] == "building", info
        time.sleep(0.2)


def test_features_graph_and_runtime_as_the_browser_gets_them(served):
    live, application, http = served
    sid, info = ready_session(http, png_bytes())
    assert info["available"] and info["state"] == "ready", info

    answer = http.get(info["features"])  # httpx asks for gzip and unpacks it, as a browser does
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-encoding"] == "gzip"
    assert "immutable" in answer.headers["cache-control"] and answer.headers["etag"]
    assert http.get(info["features"], headers={"If-None-Match": answer.headers["etag"]}).status_code == 304
    plain = http.get(info["features"], headers={"Accept-Encoding": "identity"})
    assert plain.status_code == 200 and "content-encoding" not in plain.headers and plain.content == answer.content

    # the engine's own tensors for that picture, within float16's precision
    registry = application.state.page.backend.registry
    embedding = registry.get(HQ_ID).cached(application.state.page.store.get(sid).session.picture.key)
    got = unpack_features(answer.content)
    assert info["graph"] == "sam" and "hq_features" not in got  # the SAM-tokens graph needs no HQ features
    for name, tensor in (("tokens", embedding.features.tokens),):
        expected = tensor.float().numpy()
        assert got[name].shape == expected.shape
        np.testing.assert_allclose(
            got[name].astype(np.float32), expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max()
        )
    assert got["header"]["resized_size"] == list(embedding.resized_size)

    # the graphs: immutable, and loadable and runnable by onnxruntime on those features, as the worker runs them
    # (the picture graph once per picture, its outputs fed to the decoder graph with each prompt)
    import onnxruntime

    graph = http.get(info["decoder"])
    assert graph.status_code == 200 and "immutable" in graph.headers["cache-control"]
    picture_graph = http.get(info["picture_graph"])
    assert picture_graph.status_code == 200 and "immutable" in picture_graph.headers["cache-control"]
    assert http.get(info["picture_graph"], headers={"If-None-Match": picture_graph.headers["etag"]}).status_code == 304
    picture_session = onnxruntime.InferenceSession(picture_graph.content, providers=["CPUExecutionProvider"])
    session = onnxruntime.InferenceSession(graph.content, providers=["CPUExecutionProvider"])
    tokens = got["tokens"].astype(np.float32)
    projected = dict(
        zip([o.name for o in picture_session.get_outputs()], picture_session.run(None, {"tokens": tokens}))
    )
    assert {i.name for i in session.get_inputs()} == {"tokens", *projected, "point_coords", "point_labels"}
    low, score = session.run(
        None,
        {
            "tokens": tokens,
            **projected,
            "point_coords": np.array([[[300.0, 200.0], [0.0, 0.0]]], np.float32),
            "point_labels": np.array([[1.0, -1.0]], np.float32),
        },
    )
    assert low.shape[:2] == (1, 1) and np.isfinite(low).all() and score.shape == (1,)

    # onnxruntime-web's files, ours, with their MIME types
    wasm = http.get(f"{info['runtime']}ort-wasm-simd-threaded.wasm")
    assert wasm.status_code == 200 and wasm.headers["content-type"] == "application/wasm"
    assert wasm.content[:4] == b"\0asm" and "immutable" in wasm.headers["cache-control"]
    script = http.get(f"{info['runtime']}ort.wasm.min.mjs")
    assert script.headers["content-type"].startswith("text/javascript")
    assert http.get(f"/ui/preview/runtime/{RUNTIME_VERSION}/..%2Froutes.py").status_code == 404
    assert http.get("/ui/preview/runtime/0.0.1/ort.wasm.min.mjs").status_code == 404
    assert http.get("/ui/preview/decoder/nothing.onnx").status_code == 404

    # a stranger's guess, a closed session, a replaced picture: 404, nothing built
    assert http.get(info["features"].replace(sid, "nobody")).status_code == 404
    assert http.get(f"/ui/session/{sid}/preview/features/{'0' * 64}").status_code == 404
    assert http.post(f"/ui/session/{sid}/picture", content=png_bytes(seed=9)).status_code == 200
    assert http.get(info["features"]).status_code == 404  # the old picture's key
    http.delete(f"/ui/session/{sid}")
    assert http.get(f"/ui/session/{sid}/preview").status_code == 404


def test_bytes_and_streams_bounds(served, monkeypatch):
    live, application, http = served
    preview = application.state.page.preview
    sid, info = ready_session(http, png_bytes(seed=5))
    monkeypatch.setitem(preview.options, "max_bytes", 1000)
    refused = http.get(info["features"])
    assert refused.status_code == 413 and "SAMHQ_UI_PREVIEW_MB" in refused.json()["error"]["message"]
    monkeypatch.setitem(preview.options, "max_bytes", 2**30)
    monkeypatch.setattr(preview, "streams", preview.options["streams"])  # as if that many were being sent
    busy = http.get(info["features"])
    assert busy.status_code == 429 and busy.json()["error"]["code"] == "busy"
    monkeypatch.setattr(preview, "streams", 0)
    assert http.get(info["features"]).status_code == 200
    # The stream's slot comes back when its last byte went, which the server notes just after the client has
    # read it: wait for that (a loaded machine may take a moment), never more than a few seconds.
    deadline = time.monotonic() + 10
    while preview.streams and time.monotonic() < deadline:
        time.sleep(0.02)
    assert preview.streams == 0


def test_remote_backend_page_says_why():
    """A page in front of a remote API has no model here: the preview says so (and serves no features)."""
    from ui.preview_routes import PreviewRoutes

    class Remote:  # what PreviewRoutes reads of a RemoteBackend: it has no `registry`
        pass

    class Routes:
        backend = Remote()

    assert "remote API" in PreviewRoutes(Routes()).unavailable(None)
