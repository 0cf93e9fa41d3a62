"""The page's JSON routes under /ui: sessions, the picture, edits and downloads.

The browser draws every click at once and sends the edits one after another in the order they were
made; each answer carries the new prompt and ONE small label map at preview size (a PNG of at most
1024 px) that the browser paints over the picture in the object colours. No route accepts a server path:
a picture is the request's bytes or an example's index, and everything goes through the backend
(`LocalBackend` in this process, or `RemoteBackend` for `app.py --backend URL`), hence through the API's
format, pixel, object and point limits.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import gzip
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import unquote

import numpy as np
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from PIL import Image
from starlette.requests import ClientDisconnect

from segmentation import export
from segmentation.clients import ClientIdentity
from segmentation.errors import ModelUnavailableError, SegmentationError
from segmentation.images import load_rgb
from segmentation.limits import MAX_COORDINATE, Limits
from segmentation.masks import encode_png
from segmentation.schemas import build_response
from segmentation.service import AdmissionGate, OverloadedError, SegmentResult, give_memory_back

from . import pictures, workflow
from . import state as st
from .answers import error, expired, small_json_object
from .everything_routes import install_everything_routes
from .logs import redact_access_log
from .prefetch import Prefetcher
from .preview_routes import install_preview_routes
from .remote import BackendError, RemoteBackend
from .sessions import Entry, SessionStore, StoreRefusal
from .types import Preview
from .workflow_routes import install_workflow_routes

if TYPE_CHECKING:  # the engine's backend: imported only by a process that runs the models (ui.page)
    from .backend import LocalBackend

log = logging.getLogger("ui")

PREVIEW_SIDE = 1024
ASSETS = Path(__file__).resolve().parent.parent / "assets"
DOWNLOADS = ("mask.png", "objects.json", "response.json", "snippet.py", "cutout.png")
# kept gzip-compressed in the session folder (a 20-megapixel objects.json is tens of MB of polygon text),
# sent as they are to a client that accepts gzip (every browser), else unpacked while they stream
COMPRESSED = ("objects.json", "response.json")
CHUNK = 256 * 1024


def example_pictures() -> list[Path]:
    return sorted(ASSETS.glob("*.jpg"))


def banner(model: str, reason: str) -> dict[str, str]:
    """What the page shows at the top when the model cannot be loaded: the model, the reason, the fix."""
    return {
        "model": model,
        "reason": reason,
        "fix": (
            f"Download the weights once with `hf download {model}` (pip install huggingface_hub) on a machine "
            "with internet access, and point HF_HOME at that cache; then set HF_HUB_OFFLINE=1 to start without "
            "contacting the hub. Or pass a local folder saved with save_pretrained: "
            "`python app.py --model /path/to/folder`. The page retries the model by itself."
        ),
    }


def _png_b64(labels: np.ndarray) -> str:
    return base64.b64encode(encode_png(labels)).decode()


class PageRoutes:
    """Handlers as plain functions of a session (`ui.state`), with the engine behind the backend."""

    def __init__(
        self,
        backend: LocalBackend | RemoteBackend,
        store: SessionStore,
        max_body_bytes: int,
        public_url: str | None = None,
        options: workflow.WorkflowOptions | None = None,
    ):
        self.backend = backend
        self.store = store
        self.max_body_bytes = max_body_bytes
        self.options = options or workflow.WorkflowOptions()
        self.limits = Limits.from_settings(backend.settings)  # the API's picture-file rule, the same number
        self.public_url = public_url
        # like the API's: a bounded number of page requests use the model at once, the rest wait, and
        # past `max_waiting` the page answers "busy" at once instead of piling up threads
        self.gate = AdmissionGate(max_concurrent=2, max_waiting=backend.settings.max_queue)
        self.prefetcher = Prefetcher(backend, self.gate, lambda sid: sid in store)

    # ---- views --------------------------------------------------------------------------

    def config(self, entry: Entry) -> dict[str, Any]:
        model = entry.session.model
        reason = self.backend.unavailable(model)
        return {
            "session": entry.session.id,
            "model": model,
            "models": list(self.backend.models),
            "banner": banner(model, reason) if reason else None,
            "palette": [pictures.hex_color(v) for v in range(1, len(pictures.PALETTE) + 1)],
            "examples": [{"index": i, "name": p.stem} for i, p in enumerate(example_pictures())],
            "max_mb": round(self.limits.max_picture_bytes / 2**20, 1),
            "max_pictures": self.options.pictures_per_session,
        }

    def view(self, entry: Entry, preview: Preview | None = None, status: str = "") -> dict[str, Any]:
        session = entry.session
        prompted = session.prompted()
        values = {obj.number: i + 1 for i, obj in enumerate(prompted)}
        by_value = {o.value: o for o in preview.objects} if preview else {}
        objects = []
        for obj in session.objects:
            result = by_value.get(values.get(obj.number, -1))
            objects.append(
                {
                    "number": obj.number,
                    "points": obj.points,
                    "labels": obj.labels,
                    "box": obj.box,
                    "choice": obj.choice,
                    "value": values.get(obj.number),
                    "score": result.score if result else None,
                    "percent": result.percent if result else None,
                    "candidate": result.candidate if result else None,
                    "candidates": result.candidates if result else None,
                    "can_redo": bool(obj.redo),
                    "category": obj.category,
                }
            )
        picture = session.picture
        return {
            "rev": session.rev,
            "model": session.model,
            "hq_only": session.hq_only,
            "active": session.active_object.number,
            "next_number": session.next_number,
            "objects": objects,
            "map": _png_b64(preview.labels) if preview is not None else None,
            "thumbnails": [{"png": _png_b64(m), "score": s} for m, s in preview.thumbnails] if preview else [],
            "picture": None
            if picture is None
            else {
                "name": picture.name,
                "width": picture.width,
                "height": picture.height,
                "preview": list(picture.preview),
                "embedded": picture.key is not None,
            },
            "status": status,
            "album": {"count": len(session.album), "current": session.current},
            "categories": _categories(session),
        }

    # ---- the segmentation of a session ----------------------------------------------------

    def render(self, entry: Entry, session: st.Session | None = None) -> tuple[Preview | None, str]:
        """The preview of `session` (default: the entry's). The backend decodes only the objects whose
        prompt it has not kept, so a no-op decodes nothing and a one-point edit decodes one object."""
        session = session or entry.session
        if session.picture is None:
            return None, "Upload a picture or pick an example to start."
        prompted = session.prompted()
        if not prompted:
            return None, "No points yet: click on the picture (or draw a box in Box mode)."
        positions = {obj.number: i for i, obj in enumerate(prompted)}
        active = positions.get(session.active_object.number)
        preview = self.backend.preview(
            session.model,
            session.picture,
            [obj.points for obj in prompted],
            [obj.labels for obj in prompted],
            [obj.choice for obj in prompted],
            boxes=_boxes(prompted),
            hq_only=session.hq_only,
            active=active,
        )
        if preview.reused:
            decoder = "decoder: nothing changed, kept"
        elif "decoder" in preview.timings:
            decoder = (
                f"decoder {preview.timings['decoder'] * 1e3:.0f} ms "
                f"({preview.decoded_objects} of {len(prompted)} object(s), the rest kept)"
            )
        else:  # a remote backend: the whole call is what this process sees
            decoder = "remote"
        active_box = session.active_object.box
        boxed = f" · box {_box_text(active_box)}" if active_box else ""
        status = (
            f"{len(prompted)} object(s){boxed} · {decoder} · server {preview.timings['page'] * 1e3:.0f} ms · "
            f"{session.model}"
        )
        return preview, status

    def apply(self, entry: Entry, body: dict[str, Any]) -> dict[str, Any]:
        """One edit from the browser, then the new view. The edit is made on a draft of the session whose
        prompt must pass the limits (objects, points, coordinates, work) and then render; only then is it
        stored. A refused edit leaves the session as it was, as the browser, which drops it, assumes."""
        session = entry.session
        draft = _draft(session)
        op = _edit(draft, body, self.backend.models)
        prompted = draft.prompted()
        if draft.picture is not None and prompted:
            self.backend.check(
                draft.model, draft.picture, [o.points for o in prompted], [o.labels for o in prompted], _boxes(prompted)
            )
        if draft.picture is not None and draft.picture.key is None:
            start = time.perf_counter()
            key, cached = self.backend.embed(draft.model, draft.picture)
            draft.picture = _replace_key(draft.picture, key)
            if op == "embed" or not prompted:
                vars(session).update(vars(draft))
                give_memory_back()
                how = "from the cache" if cached else f"computed in {time.perf_counter() - start:.2f} s"
                return self.view(entry, None, f"Picture ready — embedding {how}. Click on it to add a point.")
        preview, status = self.render(entry, draft)
        vars(session).update(vars(draft))
        return self.view(entry, preview, status)

    # ---- pictures -------------------------------------------------------------------------

    def load_picture(
        self, entry: Entry, upload: Path | None, name: str, example: int | None, add: bool = False, show: bool = True
    ) -> dict[str, Any]:
        """Decode through the API's limits, keep the file in the session folder, write the preview.

        `upload`: the file the route streamed the body into (in the session folder); it becomes the
        session's picture, or is removed if it is not one. `add`: another picture of the session (at the end
        of the strip, shown when `show`), else it replaces the picture on screen (with its objects)."""
        session = entry.session
        if add and len(session.album) >= self.options.pictures_per_session:
            if upload is not None:
                upload.unlink(missing_ok=True)
            raise TooManyPictures(self.options.pictures_per_session)
        slot_id = session.next_slot
        examples = example_pictures()
        if example is not None:
            if not 0 <= example < len(examples):
                raise ValueError("There is no such example.")
            source, name = str(examples[example]), examples[example].name
            rgb = self.backend.prepare(session.model, source)
        else:
            assert upload is not None
            try:
                self.limits.check_picture_bytes(upload.stat().st_size)
                rgb = self.backend.prepare(session.model, str(upload))
            except BaseException:
                upload.unlink(missing_ok=True)
                raise
            path = entry.folder / f"upload-{slot_id}-{time.monotonic_ns()}"
            upload.rename(path)
            source = str(path)
        height, width = rgb.shape[:2]
        preview = pictures.preview_size(width, height, PREVIEW_SIDE)
        small = pictures.resize_rgb(rgb, *preview)
        del rgb
        workflow.write_previews(small, workflow.folder(entry.folder, slot_id))
        picture = st.Picture(
            name=self._unique_name(session, _safe_name(name), None if add else session.current),
            width=width,
            height=height,
            preview=preview,
            source=source,
        )
        if add:
            st.add_picture(session, picture, show)
        else:
            replaced = session.album[session.current] if session.current >= 0 else None
            st.set_picture(session, picture)
            if replaced is not None:
                self._forget(entry, replaced)
        if show or not add:
            self._clear_downloads(entry)
        self.want_next(entry)
        if add and not show:  # a batch's next picture: no full collection (~1 s here) per file of the batch
            return self.view(entry, None, f"Added {picture.name} ({len(session.album)} pictures).")
        give_memory_back()
        return self.view(entry, None, f"Picture {width}×{height} — computing the embedding; clicks are kept meanwhile.")

    @staticmethod
    def _unique_name(session: st.Session, name: str, replacing: int | None) -> str:
        """File names are unique within a session (each names its files in an export): "a.jpg", "a-2.jpg"…
        (the picture being replaced gives its name up)."""
        taken = {slot.picture.name for i, slot in enumerate(session.album) if i != replacing}
        if name not in taken:
            return name
        stem, dot, suffix = name.rpartition(".")
        stem, suffix = (stem, dot + suffix) if dot else (name, "")
        n = 2
        while f"{stem}-{n}{suffix}" in taken:
            n += 1
        return f"{stem}-{n}{suffix}"

    def _forget(self, entry: Entry, slot: st.Slot) -> None:
        """A replaced picture's files go (its upload, previews and result)."""
        source = Path(slot.picture.source)
        if source.parent == entry.folder:
            source.unlink(missing_ok=True)
        workflow.remove(workflow.folder(entry.folder, slot.id))

    def want_next(self, entry: Entry) -> None:
        """Prefetch the embedding of the picture after the one on screen (if any and not embedded)."""
        session = entry.session
        following = session.current + 1
        if 0 < following < len(session.album):
            slot = session.album[following]
            self.prefetcher.want(session.id, slot.id, session.model, slot.picture)
        else:
            self.prefetcher.drop(session.id)

    # ---- downloads ------------------------------------------------------------------------

    def _clear_downloads(self, entry: Entry) -> None:
        shutil.rmtree(entry.folder / "export", ignore_errors=True)

    def download(self, entry: Entry, rev: int, name: str, base_url: str) -> IO[bytes]:
        """The file for prompt revision `rev`, built at full size on first request (one folder per session),
        opened: what is sent is that file whatever happens to the folder meanwhile (a new upload or
        revision removes it and builds new files; an open file is never truncated under a reader).
        `cutout.png` is built for each request into a nameless temporary file: it is as large as the
        picture uncompressed, so it is not kept."""
        session = entry.session
        if rev != session.rev:
            raise StaleDownload()
        if session.picture is None or not session.prompted():
            raise ValueError("Nothing to download yet: add at least one point or a box.")
        folder = entry.folder / "export"
        marker = folder / "rev"
        if not marker.exists() or marker.read_text() != str(rev):
            self._clear_downloads(entry)
            folder.mkdir()
            self._build(entry, folder, base_url)
            marker.write_text(str(rev))
            give_memory_back()
        if name == "cutout.png":
            out = tempfile.TemporaryFile(dir=folder)
            try:
                with Image.open(folder / "mask.png") as labels:
                    rgb = load_rgb(session.picture.source, self.limits.max_pixels)
                    pictures.write_cutout_png(rgb, labels, out)
                del rgb
            except BaseException:
                out.close()
                raise
            finally:
                give_memory_back()
            out.seek(0)
            return out
        if name in COMPRESSED:
            return open(folder / (name + ".gz"), "rb")
        return open(folder / name, "rb")

    def _build(self, entry: Entry, folder: Path, base_url: str) -> None:
        session = entry.session
        prompted = session.prompted()
        points = [obj.points for obj in prompted]
        labels = [obj.labels for obj in prompted]
        plan = [obj.choice for obj in prompted]
        boxes = _boxes(prompted)
        chosen = self.backend.full(
            session.model,
            session.picture,
            points,
            labels,
            plan,
            boxes=boxes,
            hq_only=session.hq_only,
        )
        # the value of an object in mask.png and objects.json is its visible number, gaps and all
        numbers = [obj.number for obj in prompted]
        numbered = workflow.renumber(chosen.labels, numbers)
        (folder / "mask.png").write_bytes(encode_png(numbered))
        prompt = [{"points": obj.points, "labels": obj.labels, "box": obj.box} for obj in prompted]
        document = export.objects_document(
            numbered, workflow.numbered_objects(chosen.objects, numbers), prompt, session.model
        )
        del numbered
        for item, obj in zip(document["objects"], prompted):
            item["name"] = f"Object {obj.number}"
            item["category"] = obj.category
        _write_gzip(folder / "objects.json.gz", json.dumps(document).encode())
        del document
        summary = SegmentResult(
            model=session.model,
            width=chosen.labels.shape[1],
            height=chosen.labels.shape[0],
            candidates=(chosen,),
            embedding_cached=chosen.cached,
            image_tokens=chosen.image_tokens,
            point_tokens=chosen.point_tokens,
        )
        _write_gzip(folder / "response.json.gz", build_response(summary).model_dump_json(indent=1).encode())
        # the API's i-th map gives every object its i-th candidate: one shared choice is reproducible exactly
        singles = {obj.choice for obj in prompted if _ambiguous(obj)}
        candidate = singles.pop() if len(singles) == 1 else 0
        snippet = export.api_snippets(
            self.public_url or base_url,
            session.model,
            points,
            labels,
            session.picture.name,
            hq_token_only=session.hq_only,
            candidate=candidate,
            boxes=boxes,
        )
        if any(_ambiguous(obj) and obj.choice != candidate for obj in prompted):
            snippet = (
                "# Note: the objects here use different candidate ranks; the API's n-th map gives every object\n"
                "# the same rank, so this call reproduces the map with each object's first candidate.\n" + snippet
            )
        (folder / "snippet.py").write_text(snippet)


class StaleDownload(Exception):
    pass


class TooManyPictures(Exception):
    def __init__(self, limit: int):
        super().__init__(
            f"This page holds at most {limit} pictures: export the session, then open the page again for more."
        )


def _write_gzip(path: Path, data: bytes) -> None:
    with gzip.open(path, "wb", compresslevel=6) as file:
        file.write(data)


def _send_file(file: IO[bytes], name: str, accepts_gzip: bool) -> Response:
    """Stream an opened download (never reopened by name: see `PageRoutes.download`)."""
    media = {"png": "image/png", "json": "application/json", "py": "text/x-python"}[name.rsplit(".", 1)[1]]
    headers = {"Cache-Control": "no-store", "Content-Disposition": f'attachment; filename="{name}"'}
    source: IO[bytes] = file
    if name in COMPRESSED:
        headers["Vary"] = "Accept-Encoding"
        if accepts_gzip:
            headers["Content-Encoding"] = "gzip"
        else:
            source = gzip.GzipFile(fileobj=file, mode="rb")  # unpacked as it streams: no length known ahead
    if source is file:
        headers["Content-Length"] = str(os.fstat(file.fileno()).st_size - file.tell())

    def chunks():
        with file, source:
            while chunk := source.read(CHUNK):
                yield chunk

    return StreamingResponse(chunks(), media_type=media, headers=headers)


def _edit(session: st.Session, body: dict[str, Any], models: tuple[str, ...]) -> str:
    """Apply the browser's edit `body` to `session` (a draft): its op, or ValueError for a bad one."""
    op = body.get("op")
    if op == "click":
        if session.picture is None:
            raise ValueError("Upload a picture first, or pick one of the examples.")
        st.add_point(session, _number(body, "x"), _number(body, "y"), bool(body.get("include", True)))
    elif op == "box":
        if session.picture is None:
            raise ValueError("Upload a picture first, or pick one of the examples.")
        st.set_box(session, *(_number(body, name) for name in ("x0", "y0", "x1", "y1")))
    elif op == "undo":
        st.undo_point(session)
    elif op == "redo":
        st.redo_point(session)
    elif op == "new":
        st.new_object(session)
    elif op == "delete":
        st.delete_object(session)
    elif op == "select":
        st.select_object(session, int(_number(body, "number")))
    elif op == "choose":
        st.choose_candidate(session, int(_number(body, "candidate")))
    elif op == "category":
        st.set_category(session, body.get("name") if isinstance(body.get("name"), str) else "")
    elif op == "clear":
        st.clear_all(session)
    elif op == "settings":
        if "hq_only" in body:
            st.set_hq_only(session, bool(body["hq_only"]))
        if "model" in body and body["model"] != session.model:
            model = str(body["model"])
            if model not in models:
                raise ValueError(f"Model {model!r} is not served here.")
            session.model = model
            if session.picture is not None:
                session.picture = _replace_key(session.picture, None)
            for slot in session.album:  # every picture's embedding was the other model's
                slot.picture = _replace_key(slot.picture, None)
            st.changed(session)
    elif op != "embed":
        raise ValueError(f"Unknown edit {op!r}.")
    return op


def _draft(session: st.Session) -> st.Session:
    """A copy of the session for an edit of the picture on screen: the other pictures' slots are shared, not
    copied (an edit never touches them, and 200 pictures' objects would make every click copy them all)."""
    album, session.album = session.album, []
    try:
        draft = copy.deepcopy(session)
    finally:
        session.album = album
    draft.album = album
    return draft


def _categories(session: st.Session) -> list[str]:
    """The category names used in the session (offered when naming the next object), the default first."""
    st.stash(session)
    names = {obj.category for slot in session.album for obj in slot.objects if obj.prompted}
    names |= {obj.category for obj in session.objects}
    names.discard(st.DEFAULT_CATEGORY)
    return [st.DEFAULT_CATEGORY, *sorted(names)][:100]


def _ambiguous(obj: st.ObjectPrompt) -> bool:
    """One point and no box: the object has three ranked candidates to choose from."""
    return len(obj.points) == 1 and obj.box is None


def _boxes(prompted: list[st.ObjectPrompt]) -> list | None:
    """The prompt's boxes aligned with its objects, or None when no object has one (a points-only call)."""
    return [obj.box for obj in prompted] if any(obj.box for obj in prompted) else None


def _box_text(box: list[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"


def _replace_key(picture: st.Picture, key: str | None) -> st.Picture:
    from dataclasses import replace

    return replace(picture, key=key)


def _number(body: dict[str, Any], name: str) -> float:
    """A finite number within the API's coordinate bound (a 30-digit integer is a 400, not a 500)."""
    value = body.get(name)
    try:
        number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    except OverflowError:
        number = math.nan
    if not math.isfinite(number) or abs(number) > MAX_COORDINATE:
        raise ValueError(f"{name} must be a number.")
    return number


def _safe_name(name: str) -> str:
    name = "".join(c for c in os.path.basename(name or "picture.jpg") if c.isalnum() or c in "._- ")
    stem, dot, suffix = name.rpartition(".")
    if dot and len(suffix) <= 8:  # a long name keeps its extension (the export's images/ need it)
        return (stem[: 99 - len(suffix)] + "." + suffix) if stem else name[:100]
    return name[:100] or "picture.jpg"


async def _receive_upload(request: Request, store: SessionStore, entry: Entry, cap: int) -> Path | Response:
    """The upload's body streamed into a new file in the session folder, chunk by chunk: a slow or
    unfinished upload holds a file handle, not memory (the guard's read deadline ends it). Each chunk is
    reserved against the disk budget before it is written (`store.reserve`): past it, a 503 and no more is
    read (the guard closes the connection). The caller releases the reservation when the upload ends."""
    path = entry.folder / f"incoming-{time.monotonic_ns()}"
    size = 0
    try:
        with open(path, "wb") as file:
            async for chunk in request.stream():
                size += len(chunk)
                if size > cap:
                    raise _TooLarge
                store.reserve(entry, len(chunk))
                file.write(chunk)
    except StoreRefusal as refusal:
        path.unlink(missing_ok=True)
        return error(refusal.status, refusal.message, refusal.code)
    except _TooLarge:
        path.unlink(missing_ok=True)
        return error(413, f"The file is larger than the {cap / 2**20:.1f} MB limit for a picture.", "file_too_large")
    except ClientDisconnect:
        path.unlink(missing_ok=True)
        return error(400, "The upload did not arrive whole.", "incomplete_upload")
    except FileNotFoundError:  # the session ended (its folder went) while the body arrived
        path.unlink(missing_ok=True)
        return expired()
    if size == 0:
        path.unlink(missing_ok=True)
        return error(400, "The upload is empty.")
    return path


class _TooLarge(Exception):
    pass


WAITING_PER_SESSION = 8  # a page sends one edit at a time; its download links (4) and a picture may overlap it


def install_page_routes(app, routes: PageRoutes, clients: ClientIdentity | None = None) -> None:
    router = APIRouter(prefix="/ui")
    store = routes.store
    clients = clients or ClientIdentity()
    _close_store_at_shutdown(app, store, routes.prefetcher.stop)
    redact_access_log()

    async def guarded(sid: str, work, request: Request | None = None, after_others: bool = False) -> Response:
        """One request of a session at a time, waited for in the event loop (a waiting request holds no
        worker thread); past `WAITING_PER_SESSION` a 429 at once; a request whose client hung up while it
        waited is dropped before it runs. `after_others`: a long job's step (an export's next picture) takes
        its model slot once other requests went first (`AdmissionGate.admit_after_others`)."""
        entry = store.get(sid)
        if entry is None:
            return expired()
        if entry.pending >= WAITING_PER_SESSION:
            return error(429, "This page has too many requests waiting: wait for the last one to finish.", "busy")
        entry.pending += 1
        try:
            async with entry.turn:
                if request is not None and await _client_left(request):
                    return Response(status_code=499)  # nobody is there to read it
                return await run_in_threadpool(_run, entry, work, after_others)
        finally:
            entry.pending -= 1

    def _run(entry: Entry, work, after_others: bool = False) -> Response:
        admit = routes.gate.admit_after_others if after_others else routes.gate.admit
        try:
            with admit():  # one model slot per request, taken only once this session's turn came
                return work(entry)
        except ModelUnavailableError as failure:
            model = entry.session.model
            return error(503, failure.message, "model_unavailable", banner=banner(model, failure.message))
        except BackendError as failure:
            return error(failure.status, failure.message, failure.code)
        except OverloadedError as failure:
            return error(429, failure.message, "rate_limit_exceeded")
        except StoreRefusal as refusal:
            return error(refusal.status, refusal.message, refusal.code)
        except SegmentationError as failure:
            return error(400, failure.message, failure.code or "invalid_request")
        except ValueError as failure:
            return error(400, str(failure))
        except FileNotFoundError:  # the session was closed or pushed out while this request ran
            return expired()
        except StaleDownload:
            return error(409, "This download belongs to an earlier prompt: press Download again.", "stale")
        except TooManyPictures as refusal:
            return error(409, str(refusal), "too_many_pictures")
        finally:
            store.measure(entry)

    @router.post("/session")
    async def open_session(request: Request) -> Response:
        try:
            entry = store.open(routes.backend.default, clients.of(request.scope))
        except StoreRefusal as refusal:
            return error(refusal.status, refusal.message, refusal.code)
        return JSONResponse(routes.config(entry))

    @router.delete("/session/{sid}")
    async def close_session(sid: str) -> Response:
        store.drop(sid)
        return Response(status_code=204)

    @router.post("/session/{sid}/picture")
    async def picture(sid: str, request: Request) -> Response:
        example = request.query_params.get("example")
        try:
            index = None if example is None else int(example)
        except ValueError:
            return error(400, "example must be an index.")
        add = request.query_params.get("add", "") in ("1", "true")  # another picture of the session
        show = request.query_params.get("show", "1") not in ("0", "false")
        entry = store.get(sid)
        if entry is None:  # answered before the body is read; the guard closes the connection (never drained)
            return expired()
        if add and len(entry.session.album) >= routes.options.pictures_per_session:  # before a byte is read
            return error(409, str(TooManyPictures(routes.options.pictures_per_session)), "too_many_pictures")
        upload = None
        if index is None:
            cap = routes.limits.max_picture_bytes
            announced = request.headers.get("content-length", "")
            if announced.isdigit() and int(announced) > cap:  # refused before a byte is read (and never drained)
                return error(
                    413, f"The file is larger than the {cap / 2**20:.1f} MB limit for a picture.", "file_too_large"
                )
            if entry.uploading:  # one upload at a time per session, refused before its body is read
                return error(429, "A picture is already being uploaded to this page: wait for it to finish.", "busy")
            entry.uploading = True
        try:
            if index is None:
                upload = await _receive_upload(request, store, entry, cap)
                if isinstance(upload, Response):
                    return upload
            name = unquote(request.headers.get("x-filename", "picture.jpg"))

            def load(entry: Entry) -> Response:
                if entry.exporting and not add and entry.session.current >= 0:  # the export reads its files
                    return error(409, "An export of this page is being prepared: replace the picture after it.", "busy")
                store.make_room(entry, upload.stat().st_size if upload is not None else 0)  # all sessions' budget
                return JSONResponse(routes.load_picture(entry, upload, name, index, add=add, show=show))

            response = await guarded(sid, load, request)
            if upload is not None:
                upload.unlink(missing_ok=True)  # kept (renamed) when it became the picture; else gone
            return response
        finally:
            if index is None:
                entry.uploading = False
                store.release(entry)  # its file, if kept, was counted by `measure`

    @router.post("/session/{sid}/op")
    async def op(sid: str, request: Request) -> Response:
        body = await small_json_object(request, 4096, "The edit")
        if isinstance(body, Response):
            return body
        return await guarded(sid, lambda entry: JSONResponse(routes.apply(entry, body)), request)

    @router.get("/session/{sid}/preview.jpg")
    async def preview_picture(sid: str) -> Response:
        entry = store.get(sid)
        session = entry.session if entry else None
        path = None
        try:  # read without the turn: a removal running meanwhile may have shortened the strip
            if session is not None and session.current >= 0:
                path = workflow.folder(entry.folder, session.album[session.current].id) / "preview.jpg"
        except IndexError:
            pass
        if path is None or not path.exists():
            return error(404, "No picture in this session.")
        return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    @router.get("/session/{sid}/download/{rev}/{name}")
    async def download(sid: str, rev: int, name: str, request: Request) -> Response:
        if name not in DOWNLOADS:
            return error(404, "No such download.")
        base_url = str(request.base_url).rstrip("/")

        accepts_gzip = "gzip" in request.headers.get("accept-encoding", "").lower()

        def work(entry: Entry) -> Response:
            store.make_room(entry, 0)  # downloads are written into the session's folder: within the budget
            return _send_file(routes.download(entry, rev, name, base_url), name, accepts_gzip)

        return await guarded(sid, work, request)

    install_everything_routes(router, routes, guarded)  # ui/everything_routes.py: the Everything button
    install_workflow_routes(router, routes, guarded)  # ui/workflow_routes.py: several pictures, exports
    install_preview_routes(router, routes, guarded)  # ui/preview_routes.py: the hover preview's files

    @router.get("/examples/{index}.jpg")
    async def example_thumbnail(index: int) -> Response:
        examples = example_pictures()
        if not 0 <= index < len(examples):
            return error(404, "No such example.")
        return FileResponse(examples[index], media_type="image/jpeg")

    app.include_router(router)


async def _client_left(request: Request) -> bool:
    """Whether the client hung up. A bodiless request's first receive is its (empty) body: look twice."""
    return await request.is_disconnected() or await request.is_disconnected()


def _close_store_at_shutdown(app, store: SessionStore, stop=lambda: None) -> None:
    """Every session folder (visitors' uploads) goes when the server stops, inside the app's lifespan."""
    previous = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(application):
        try:
            async with previous(application) as state:
                yield state
        finally:
            stop()  # the background prefetch
            store.close()

    app.router.lifespan_context = lifespan
