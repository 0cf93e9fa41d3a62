"""The hover preview's routes: what the browser needs to run the decoder itself while the pointer rests.

Per picture the page fetches its features once (`PictureFeatures.tokens`, and `.hq_features` for the HQ graph,
as float16, gzip), per model the decoder graph and its small picture graph once (`onnx_graph.export_browser_decoder`,
exported on first use and kept on disk, see `service.browser_decoder_path`; the worker runs the picture graph once
per picture for the first layer's projections, the decoder graph per hover), and onnxruntime-web's files from our
own server (ui/static/vendor; no CDN).
A click still goes to the server, whose answer is authoritative: the preview is only a drawing.

Which graph (SAMHQ_UI_PREVIEW_GRAPH): `hq` (default), the very answer a click gets, or `sam`, the first-ranked
candidate of SAM's own tokens without the HQ mask: ~1.6-2.3× faster in wasm and a third of the bytes per picture, but
a different mask from the click's (docs/PERFORMANCE.md has the figures; neither comes before a click's answer on
this 2-core CPU, hence the preview is off by default).

The same rules as the page's downloads: the features route is per session and runs in the session's turn
(unknown or expired session 404, a picture key that is not the session's current one 404), takes a model slot
of the page's gate while it builds, writes its file in the session's folder within the disk budget, is bounded
in bytes (`SAMHQ_UI_PREVIEW_MB`) and in streams at once (`SAMHQ_UI_PREVIEW_STREAMS`, past it 429); everything
is under /ui, so the page's login guards it. Files are immutable under their URL (the picture's key, the graph's
weight digest, the runtime's version): the browser keeps them and asks once.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import threading
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

from segmentation.errors import SegmentationError

from .answers import error, expired

if TYPE_CHECKING:
    from .routes import PageRoutes
    from .sessions import Entry

log = logging.getLogger("ui")

STATIC = Path(__file__).parent / "static"
VENDOR = STATIC / "vendor" / "onnxruntime-web"
RUNTIME_VERSION = (VENDOR / "VERSION").read_text().strip() if (VENDOR / "VERSION").exists() else "missing"
RUNTIME_FILES = {  # the wasm backend's files only (ui/static/vendor/onnxruntime-web/README.md)
    "ort.wasm.min.mjs": "text/javascript",
    "ort-wasm-simd-threaded.mjs": "text/javascript",
    "ort-wasm-simd-threaded.wasm": "application/wasm",
}
IMMUTABLE = "private, max-age=31536000, immutable"  # private: behind the page's login, never in a shared cache
MAGIC = b"SAMHQF1\n"
CHUNK = 256 * 1024


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    return float(raw) if raw else default


def preview_options() -> dict[str, Any]:
    """The preview's knobs (README): on at all, the toggle's first state, the bytes and streams bounds."""
    return {
        "enabled": os.environ.get("SAMHQ_UI_PREVIEW", "1").strip().lower() not in ("0", "false", "off", "no"),
        "default_on": os.environ.get("SAMHQ_UI_PREVIEW_DEFAULT", "off").strip().lower() in ("1", "true", "on"),
        "max_bytes": int(_env_number("SAMHQ_UI_PREVIEW_MB", 32) * 2**20),
        "streams": max(1, int(_env_number("SAMHQ_UI_PREVIEW_STREAMS", 4))),
        "isolate": os.environ.get("SAMHQ_UI_ISOLATE", "0").strip().lower() in ("1", "true", "on", "yes"),
        "graph": "sam" if os.environ.get("SAMHQ_UI_PREVIEW_GRAPH", "hq").strip().lower() == "sam" else "hq",
    }


class CrossOriginIsolation:
    """ASGI middleware (SAMHQ_UI_ISOLATE=1): COOP same-origin + COEP require-corp on every answer, so the page is
    cross-origin isolated and onnxruntime-web may run wasm threads. Off by default: tested in Chromium, Gradio's
    page still loads, uploads and clicks with it (docs/RELIABILITY.md), but an embedding page (an HF Space's
    iframe) or a cross-origin resource without CORP added later would be blocked or not isolated."""

    HEADERS = [(b"cross-origin-opener-policy", b"same-origin"), (b"cross-origin-embedder-policy", b"require-corp")]

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def isolated(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.HEADERS]}
            await send(message)

        await self.app(scope, receive, isolated)


def pack_features(features) -> bytes:
    """`service.PreviewFeatures` as one file: MAGIC, a little-endian u32 header length, the JSON header (sizes,
    each array's shape and offset), zero pad to 8 bytes, then each float16 array as two byte planes (all low
    bytes, then all high bytes), which gzip packs much tighter than interleaved halves. No hq_features (the
    SAM-tokens graph), no such array."""
    arrays, payload, offset = [], [], 0
    for name in ("tokens", "hq_features"):
        if getattr(features, name) is None:
            continue
        array = np.ascontiguousarray(getattr(features, name), dtype="<f2")
        planes = array.view(np.uint8).reshape(-1, 2).T.tobytes()
        arrays.append({"name": name, "shape": list(array.shape), "offset": offset, "bytes": len(planes)})
        payload.append(planes)
        offset += len(planes)
    header = json.dumps(
        {
            "key": features.key,
            "dtype": "float16",
            "layout": "byte-planes",
            "original_size": list(features.original_size),
            "resized_size": list(features.resized_size),
            "arrays": arrays,
        }
    ).encode()
    header += b" " * (-(len(MAGIC) + 4 + len(header)) % 8)
    return MAGIC + len(header).to_bytes(4, "little") + header + b"".join(payload)


def unpack_features(data: bytes) -> dict[str, Any]:
    """The inverse of `pack_features` (tests and benchmarks read the route's bytes with it)."""
    if not data.startswith(MAGIC):
        raise ValueError("not a features file")
    length = int.from_bytes(data[len(MAGIC) : len(MAGIC) + 4], "little")
    start = len(MAGIC) + 4
    header = json.loads(data[start : start + length])
    body = memoryview(data)[start + length :]
    out: dict[str, Any] = {"header": header}
    for item in header["arrays"]:
        planes = np.frombuffer(body[item["offset"] : item["offset"] + item["bytes"]], np.uint8).reshape(2, -1)
        out[item["name"]] = np.ascontiguousarray(planes.T).view("<f2").reshape(item["shape"])
    return out


def picture_token(key: str, graph: str = "hq") -> str:
    """The URL name of a picture's features: a digest of its embedding key (which holds the model id's '/') and of
    the graph they are for (the files differ, and each is immutable under its URL)."""
    return hashlib.sha256((key if graph == "hq" else f"{key}|{graph}").encode()).hexdigest()[:32]


class PreviewGraphs:
    """The browser decoder graph of each served model, exported once in a background thread (seconds: no
    request waits for it, the page asks again), then served by its weight digest."""

    def __init__(self, registry, sam_only: bool = False):
        self.registry = registry
        self.sam_only = sam_only
        self.state: dict[str, tuple[str, Any]] = {}  # model → ("building", None) | ("ready", Path) | ("failed", why)
        self.by_name: dict[str, Path] = {}
        self._lock = threading.Lock()

    def get(self, model: str, start: bool = True) -> tuple[str, Any] | None:
        """The model's graph state; without `start`, None when no build was asked for yet."""
        with self._lock:
            state = self.state.get(model)
            if not start and (state is None or state[0] == "failed" and state[1].startswith("retry:")):
                return None
            if state is None or state[0] == "failed" and state[1].startswith("retry:"):
                self.state[model] = ("building", None)
                threading.Thread(target=self._build, args=(model,), daemon=True, name="preview-graph").start()
                return ("building", None)
            return state

    def _build(self, model: str) -> None:
        from segmentation.onnx_graph import picture_graph_path
        from segmentation.service import browser_decoder_path

        try:
            path = browser_decoder_path(self.registry, model, sam_only=self.sam_only)
            state: tuple[str, Any] = ("ready", path)
            self.by_name[picture_graph_path(path).stem] = picture_graph_path(path)
            self.by_name[path.stem] = path
        except SegmentationError as failure:
            state = ("failed", failure.message)  # no HQ features, no export tools: stays so for this process
            if failure.code == "model_unavailable":
                state = ("failed", "retry:" + failure.message)
        except Exception as failure:  # an export that breaks must leave a reason the page can show
            log.warning("browser decoder for %s failed: %s", model, str(failure)[:200])
            state = ("failed", "The preview's decoder could not be built on this server.")
        with self._lock:
            self.state[model] = state


class PreviewRoutes:
    def __init__(self, routes: PageRoutes):
        self.routes = routes
        self.options = preview_options()
        registry = getattr(routes.backend, "registry", None)  # None: a remote backend (app.py --backend)
        sam_only = self.options["graph"] == "sam"
        self.graphs = PreviewGraphs(registry, sam_only) if registry is not None else None
        self.streams = 0
        self._lock = threading.Lock()

    def unavailable(self, entry: Entry) -> str | None:
        if not self.options["enabled"]:
            return "The hover preview is turned off on this server (SAMHQ_UI_PREVIEW=0)."
        if self.graphs is None:
            return "The hover preview needs the model in this process; this page segments through a remote API."
        if RUNTIME_VERSION == "missing":
            return "The hover preview's runtime (onnxruntime-web) is not installed on this server."
        return None

    def info(self, entry: Entry, prepare: bool) -> dict[str, Any]:
        """What the page needs to start the preview for its current picture, or why it cannot. The graph's
        export starts only when the page `prepare`s (its toggle is on), so a page that never uses the
        preview costs nothing."""
        base = {"available": False, "default_on": self.options["default_on"], "key": None}
        reason = self.unavailable(entry)
        if reason:
            return {**base, "state": "unavailable", "reason": reason}
        session = entry.session
        known = self.graphs.get(session.model, start=prepare)
        if known is None:
            return {**base, "state": "idle", "reason": "Turn the preview on to prepare it."}
        state, value = known
        if state == "failed":
            return {**base, "state": "unavailable", "reason": value.removeprefix("retry:")}
        if state == "building":
            return {**base, "state": "building", "reason": "Preparing the preview's decoder (once per model)…"}
        picture = session.picture
        if picture is None or picture.key is None:
            return {**base, "state": "waiting", "reason": "The preview starts when the picture is ready."}
        from segmentation.onnx_graph import picture_graph_path

        sid, token = session.id, picture_token(picture.key, self.options["graph"])
        return {
            **base,
            "available": True,
            "state": "ready",
            "reason": None,
            "key": token,
            "features": f"/ui/session/{sid}/preview/features/{token}",
            "decoder": f"/ui/preview/decoder/{value.stem}.onnx",
            "picture_graph": f"/ui/preview/decoder/{picture_graph_path(value).stem}.onnx",
            "runtime": f"/ui/preview/runtime/{RUNTIME_VERSION}/",
            "worker": "/ui/preview/worker.js",
            "threads": 4 if self.options["isolate"] else 1,  # used only where the page is cross-origin isolated
            "graph": self.options["graph"],
        }

    def features_file(self, entry: Entry, token: str) -> Path:
        """The gzip file of the session's current picture's features (built once per picture in its folder)."""
        from segmentation.service import preview_features

        session = entry.session
        graph = self.options["graph"]
        if session.picture is None or session.picture.key is None or picture_token(session.picture.key, graph) != token:
            raise LookupError
        key = session.picture.key
        path = entry.folder / f"preview-features-{token}.gz"
        if path.exists():
            return path
        features = preview_features(
            self.routes.backend.registry, session.model, key, session.picture.source, with_hq=graph == "hq"
        )
        if features.key != key:  # the pixels hash to another key than the session recorded: not this picture
            raise LookupError
        if features.nbytes > self.options["max_bytes"]:
            raise TooLarge(features.nbytes)
        data = gzip.compress(pack_features(features), compresslevel=6)
        del features
        self.routes.store.make_room(entry, len(data))  # the session folder's disk budget, as downloads
        for old in entry.folder.glob("preview-features-*"):
            old.unlink(missing_ok=True)
        partial = path.with_suffix(".part")
        partial.write_bytes(data)
        os.replace(partial, path)
        log.info("preview features: %.1f MB gzip", len(data) / 2**20)
        return path

    def stream(self, path: Path, etag: str, accepts_gzip: bool) -> Response:
        """The opened file, counted against the streams bound until its last byte is sent."""
        with self._lock:
            if self.streams >= self.options["streams"]:
                return error(429, "The server is sending many previews right now: try again in a moment.", "busy")
            self.streams += 1
        try:
            file = open(path, "rb")
        except BaseException:
            self._done()
            raise
        headers = {"Cache-Control": IMMUTABLE, "ETag": etag, "Vary": "Accept-Encoding"}
        source: Any = file
        if accepts_gzip:
            headers["Content-Encoding"] = "gzip"
            headers["Content-Length"] = str(os.fstat(file.fileno()).st_size)
        else:
            source = gzip.GzipFile(fileobj=file, mode="rb")

        released = [False]

        def release() -> None:  # once: at the last byte, or when a response that never started is dropped
            with self._lock:
                if released[0]:
                    return
                released[0] = True
                self.streams -= 1
            file.close()

        def chunks():
            try:
                while chunk := source.read(CHUNK):
                    yield chunk
            finally:
                release()

        body = chunks()
        weakref.finalize(body, release)  # a client gone before the body started never runs the generator
        return StreamingResponse(body, media_type="application/octet-stream", headers=headers)

    def _done(self) -> None:
        with self._lock:
            self.streams -= 1


class TooLarge(Exception):
    def __init__(self, nbytes: int):
        self.nbytes = nbytes


def install_preview_routes(router: APIRouter, routes: PageRoutes, guarded) -> PreviewRoutes:
    """Adds /ui/session/{sid}/preview (what to fetch), …/preview/features/{key}, /ui/preview/decoder/{name}.onnx (the
    decoder graph and its picture graph),
    /ui/preview/runtime/{version}/{file} and /ui/preview/worker.js."""
    preview = PreviewRoutes(routes)
    routes.preview = preview

    @router.get("/session/{sid}/preview")
    async def info(sid: str, request: Request) -> Response:
        entry = routes.store.get(sid)
        if entry is None:
            return expired()
        prepare = request.query_params.get("prepare") == "1"
        return JSONResponse(preview.info(entry, prepare), headers={"Cache-Control": "no-store"})

    @router.get("/session/{sid}/preview/features/{key}")
    async def features(sid: str, key: str, request: Request) -> Response:
        entry = routes.store.get(sid)
        if entry is None:
            return expired()
        reason = preview.unavailable(entry)
        if reason:
            return error(404, reason, "preview_unavailable")
        etag = f'"{key[:64]}"'
        picture = entry.session.picture
        if picture is None or picture.key is None or picture_token(picture.key, preview.options["graph"]) != key:
            return error(404, "No such picture in this session (it was replaced): ask for the preview again.")
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers={"ETag": etag, "Cache-Control": IMMUTABLE})
        accepts_gzip = "gzip" in request.headers.get("accept-encoding", "").lower()

        def work(entry: Entry) -> Response:
            try:
                path = preview.features_file(entry, key)
            except LookupError:
                return error(404, "No such picture in this session (it was replaced): ask for the preview again.")
            except TooLarge as large:
                limit = preview.options["max_bytes"] / 2**20
                return error(
                    413,
                    f"This picture's preview needs {large.nbytes / 2**20:.1f} MB, more than this server's "
                    f"{limit:.0f} MB (SAMHQ_UI_PREVIEW_MB).",
                    "too_large",
                )
            return preview.stream(path, etag, accepts_gzip)

        return await guarded(sid, work, request)

    @router.get("/preview/decoder/{name}.onnx")
    async def decoder(name: str, request: Request) -> Response:
        path = preview.graphs.by_name.get(name) if preview.graphs is not None else None
        if path is None or not path.exists():
            return error(404, "No such decoder graph.")
        etag = f'"{name[-64:]}"'
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers={"ETag": etag, "Cache-Control": IMMUTABLE})
        return FileResponse(
            path, media_type="application/octet-stream", headers={"Cache-Control": IMMUTABLE, "ETag": etag}
        )

    @router.get("/preview/runtime/{version}/{name}")
    async def runtime(version: str, name: str) -> Response:
        if version != RUNTIME_VERSION or name not in RUNTIME_FILES or not (VENDOR / name).exists():
            return error(404, "No such file.")
        return FileResponse(VENDOR / name, media_type=RUNTIME_FILES[name], headers={"Cache-Control": IMMUTABLE})

    @router.get("/preview/worker.js")
    async def worker() -> Response:
        return FileResponse(
            STATIC / "preview-worker.js", media_type="text/javascript", headers={"Cache-Control": "no-cache"}
        )

    return preview
