"""The page's routes for several pictures in one session: the strip's list, moving between pictures, their
thumbnails, and the data-set exports (one picture, or the whole session as one zip).

Held to the same rules as every /ui route (docs/RELIABILITY.md): a session's requests take its turn
(`guarded`), a model slot only for what decodes; files live in the session folder within the disk budget
(an export's zip is a nameless file whose bytes are reserved against the budget as they are written); the
number of pictures per session, the bytes of a zip and the time of an export are bounded
(`SAMHQ_UI_PICTURES_PER_SESSION`, `SAMHQ_UI_EXPORT_MB`, `SAMHQ_UI_EXPORT_SECONDS`), one export at a time per
session, each past its bound with a message in words. An export is built in two steps: under the session's
turn, every picture whose kept result is older than its objects is written again (`persist`, usually only
the picture on screen: the others were written when the person left them); then, outside the turn (clicks
go on meanwhile), the zip is written from those small files and streamed.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import numpy as np
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

from segmentation.service import give_memory_back

from . import state as st
from . import workflow
from .answers import error, expired
from .sessions import Entry, StoreRefusal

CHUNK = 256 * 1024
EXPORTS_AT_ONCE = 2  # exports prepared at once on the server (each up to SAMHQ_UI_EXPORT_SECONDS of CPU)
log = logging.getLogger("ui")


class ExportRefused(Exception):
    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class Workflow:
    """Handlers as plain functions of a session entry, beside `PageRoutes` (`routes`)."""

    def __init__(self, routes):
        self.routes = routes
        self.preparing = 0  # exports being brought up to date or written, all sessions together

    # ---- the strip ------------------------------------------------------------------------------

    def listing(self, entry: Entry) -> dict[str, Any]:
        """Every picture of the session for the strip: name, objects, whether its embedding is ready (cached:
        moving to it answers without the image encoder) and whether its result is kept on disk."""
        session = entry.session
        backend = self.routes.backend
        prefetcher = self.routes.prefetcher
        items = []
        for index, slot in enumerate(list(session.album)):
            live = index == session.current
            picture = session.picture if live and session.picture is not None else slot.picture
            objects = session.objects if live else slot.objects
            key = picture.key or prefetcher.key(session.id, slot.id, session.model)
            items.append(
                {
                    "index": index,
                    "name": picture.name,
                    "width": picture.width,
                    "height": picture.height,
                    "objects": sum(obj.prompted for obj in objects),
                    "current": live,
                    "ready": bool(key) and _embedded(backend, session.model, key),
                    "prefetching": prefetcher.running(session.id) == slot.id,
                }
            )
        return {
            "current": session.current,
            "count": len(items),
            "max_pictures": self.routes.options.pictures_per_session,
            "pictures": items,
        }

    def switch(self, entry: Entry, index: int) -> dict[str, Any]:
        """Move to picture `index`: the one left keeps its objects and has its result written; the next one's
        embedding is prefetched. The view has the new picture's map when it has objects (embedding it first
        if the cache lost it), else none: the page then asks for its embedding (`embed`), at once from the
        cache when the prefetch got there first."""
        session = entry.session
        if not 0 <= index < len(session.album):
            raise LookupError(index)
        if index != session.current:
            if not entry.exporting:  # an export reads the kept results meanwhile: written at the next one
                self.persist(entry, session.current)
            st.switch_picture(session, index)
            self.routes._clear_downloads(entry)
        slot = session.album[index]
        if session.picture.key is None:  # the prefetch's key, if the embedding is still cached
            key = self.routes.prefetcher.key(session.id, slot.id, session.model)
            if key and _embedded(self.routes.backend, session.model, key):
                session.picture = slot.picture = _with_key(session.picture, key)
        self.routes.want_next(entry)
        picture = session.picture
        if session.prompted():
            preview, status = self.routes.render(entry)
            st.stash(session)
            session.album[index].picture = session.picture
            return self.routes.view(entry, preview, f"Picture {index + 1} of {len(session.album)} · {status}")
        ready = "ready" if picture.key else "computing its embedding"
        return self.routes.view(entry, None, f"Picture {index + 1} of {len(session.album)}: {picture.name} — {ready}.")

    def remove(self, entry: Entry, index: int) -> dict[str, Any]:
        """Take picture `index` out of the session with its files; the view of the picture then on screen."""
        session = entry.session
        if not 0 <= index < len(session.album):
            raise LookupError(index)
        shown = session.current
        removed = st.remove_picture(session, index)
        self.routes._forget(entry, removed)
        if index == shown:
            self.routes._clear_downloads(entry)
        else:
            st.changed(session)
        view = self.switch(entry, session.current)
        view["status"] = f"Removed {removed.picture.name} · {view['status']}"
        return view

    # ---- each picture's result on disk ------------------------------------------------------------

    def persist(self, entry: Entry, index: int) -> None:
        """Write picture `index`'s result (full-size label map, value = visible number; its objects) unless the
        kept one is already for its current prompt; a picture without objects keeps no result."""
        session = entry.session
        if not 0 <= index < len(session.album):
            return
        slot = st.slot(session, index)
        target = workflow.folder(entry.folder, slot.id)
        prompted = [obj for obj in slot.objects if obj.prompted]
        if not prompted:
            for name in ("labels.png", "result.json"):
                (target / name).unlink(missing_ok=True)
            slot.saved = ""
            return
        sig = workflow.signature(session.model, session.hq_only, slot.picture, slot.objects)
        if slot.saved == sig and (target / "labels.png").exists():
            return
        self.routes.store.make_room(entry, 0)
        full = self.routes.backend.full(
            session.model,
            slot.picture,
            [obj.points for obj in prompted],
            [obj.labels for obj in prompted],
            [obj.choice for obj in prompted],
            boxes=[obj.box for obj in prompted] if any(obj.box for obj in prompted) else None,
            hq_only=session.hq_only,
        )
        numbers = [obj.number for obj in prompted]
        labels = workflow.renumber(full.labels, numbers)
        workflow.write_result(target, labels, workflow.numbered_objects(full.objects, numbers), prompted, sig)
        slot.saved = sig  # no give_memory_back here: a full collection (~1 s in this process) at every move

    # ---- exports --------------------------------------------------------------------------------

    def prepare(self, entry: Entry, indices: list[int], deadline: float) -> list[Any]:
        """Under the session's turn, once every picture's result is up to date (`persist`, a turn and a model
        slot per picture): what the zip writer reads (lazily)."""
        session = entry.session
        for index in indices:  # already done one by one: only a picture edited since is written here
            if time.monotonic() > deadline:
                raise ExportRefused(413, self._too_slow(), "export_too_slow")
            self.persist(entry, index)
        records = []
        for index in indices:
            slot = session.album[index]
            records.append((slot.picture, workflow.folder(entry.folder, slot.id), slot.saved))
        return records

    def _too_slow(self) -> str:
        seconds = self.routes.options.export_seconds
        return (
            f"The export took longer than its {seconds:g} s limit: export fewer pictures at a time "
            "(each picture has its own export button), or ask the operator to raise SAMHQ_UI_EXPORT_SECONDS."
        )

    def _too_large(self) -> str:
        megabytes = self.routes.options.export_bytes / 2**20
        return (
            f"The export would be larger than its {megabytes:g} MB limit: export the pictures one at a time, "
            "or ask the operator to raise SAMHQ_UI_EXPORT_MB."
        )

    def write(self, entry: Entry, records: list[Any], whole: bool, deadline: float) -> IO[bytes]:
        """The zip, written into a nameless file in the session folder (its bytes reserved against the disk
        budget as they are written), opened at its start. `whole`: the data set (COCO, YOLO, every picture),
        else one picture's files."""
        from . import dataset_export as dx  # h18-exports' writers

        out = tempfile.TemporaryFile(dir=entry.folder)
        store = self.routes.store
        budget = _Reserving(out, lambda n: store.reserve_export(entry, n))
        max_bytes = self.routes.options.export_bytes
        try:
            pictures = _LazyPictures(records)
            if whole:
                dx.write_dataset_zip(pictures, budget, max_bytes=max_bytes, deadline_s=deadline - time.monotonic())
            else:
                files = dx.picture_files(pictures[0])
                if sum(len(data) for data in files.values()) > max_bytes:  # stored files: the zip is no smaller
                    raise ExportRefused(413, self._too_large(), "export_too_large")
                with zipfile.ZipFile(budget, "w", zipfile.ZIP_DEFLATED) as archive:
                    for name, data in files.items():
                        if time.monotonic() > deadline:
                            raise ExportRefused(413, self._too_slow(), "export_too_slow")
                        packed = Path(name).suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")
                        archive.writestr(name, data, compress_type=zipfile.ZIP_STORED if packed else None)
                del files
                if budget.written > max_bytes:
                    raise ExportRefused(413, self._too_large(), "export_too_large")
        except dx.ExportTooLarge:
            out.close()
            raise ExportRefused(413, self._too_large(), "export_too_large") from None
        except dx.ExportTooSlow:
            out.close()
            raise ExportRefused(413, self._too_slow(), "export_too_slow") from None
        except BaseException:
            out.close()
            raise
        finally:
            give_memory_back()
        out.seek(0)
        return out


class _Reserving:
    """A writable file that reserves each write's bytes against the disk budget before writing them."""

    def __init__(self, file: IO[bytes], reserve):
        self.file, self.reserve, self.written = file, reserve, 0

    def write(self, data) -> int:
        size = len(data)
        self.reserve(size)
        self.written += size
        return self.file.write(data)

    def tell(self) -> int:
        return self.file.tell()

    def seek(self, *args) -> int:
        return self.file.seek(*args)

    def flush(self) -> None:
        self.file.flush()

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True


class _LazyPictures(Sequence):
    """The export's pictures, each read from its kept files only when the writer reaches it (200 full-size
    label maps never sit in memory together)."""

    def __init__(self, records: list[tuple[st.Picture, Path, str]]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        from . import dataset_export as dx

        picture, folder, saved = self.records[index]
        result = workflow.read_result(folder) if saved else None
        if result is None:
            labels = np.zeros((picture.height, picture.width), dtype=np.uint8)
            objects: tuple = ()
        else:
            labels = workflow.read_labels(folder)
            objects = tuple(
                dx.ExportObject(number=o["number"], category=o["category"], score=o["score"]) for o in result["objects"]
            )
        source = Path(picture.source)
        return dx.ExportPicture(
            name=picture.name,
            width=picture.width,
            height=picture.height,
            label_map=labels,
            objects=objects,
            image_path=source if source.is_file() else None,
        )


def _embedded(backend, model: str, key: str) -> bool:
    """Whether the embedding under `key` is still cached (a remote backend: whether it was made at all)."""
    check = getattr(backend, "is_embedded", None)
    return True if check is None else check(model, key)


def _with_key(picture: st.Picture, key: str) -> st.Picture:
    from dataclasses import replace

    return replace(picture, key=key)


def install_workflow_routes(router: APIRouter, routes, guarded) -> None:
    """/ui/session/{sid}/pictures (GET the strip), …/pictures/{index} (POST: move there),
    …/pictures/{index}/thumb.jpg, …/export/picture/{index}.zip and …/export/session.zip."""
    flow = Workflow(routes)
    routes.workflow = flow
    store = routes.store

    @router.get("/session/{sid}/pictures")
    async def listing(sid: str) -> Response:
        entry = store.get(sid)
        return expired() if entry is None else JSONResponse(flow.listing(entry))

    @router.post("/session/{sid}/pictures/{index}")
    async def switch(sid: str, index: int, request: Request) -> Response:
        def work(entry: Entry) -> Response:
            try:
                return JSONResponse(flow.switch(entry, index))
            except LookupError:
                return error(404, "This page has no such picture.", "no_such_picture")

        return await guarded(sid, work, request)

    @router.delete("/session/{sid}/pictures/{index}")
    async def remove(sid: str, index: int, request: Request) -> Response:
        def work(entry: Entry) -> Response:
            if entry.exporting:
                return error(409, "An export of this page is being prepared: remove the picture after it.", "busy")
            try:
                return JSONResponse(flow.remove(entry, index))
            except LookupError:
                return error(404, "This page has no such picture.", "no_such_picture")

        return await guarded(sid, work, request)

    @router.get("/session/{sid}/pictures/{index}/thumb.jpg")
    async def thumbnail(sid: str, index: int) -> Response:
        entry = store.get(sid)
        if entry is None:
            return expired()
        album = entry.session.album
        try:  # read without the turn: a removal running meanwhile may shorten the strip between check and read
            path = workflow.folder(entry.folder, album[index].id) / "thumb.jpg" if 0 <= index < len(album) else None
        except IndexError:
            path = None
        if path is None or not path.exists():
            return error(404, "This page has no such picture.", "no_such_picture")
        return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    async def export(sid: str, request: Request, index: int | None) -> Response:
        entry = store.get(sid)
        if entry is None:
            return expired()
        album = entry.session.album
        if index is not None and not 0 <= index < len(album):
            return error(404, "This page has no such picture.", "no_such_picture")
        if not album:
            return error(400, "Nothing to export yet: upload a picture and label it.", "nothing_to_export")
        if entry.exporting:
            return error(429, "An export of this page is already being prepared: wait for it to finish.", "busy")
        if flow.preparing >= EXPORTS_AT_ONCE:  # the zips' CPU, bounded on the server as Everything's runs are
            return error(429, "The server is preparing other exports right now: try again in a minute.", "busy")
        flow.preparing += 1  # counted in the event loop: no lock
        entry.exporting = True
        sent = False
        try:
            deadline = time.monotonic() + routes.options.export_seconds
            indices = [index] if index is not None else list(range(len(album)))

            def prepare(e: Entry) -> Any:
                try:
                    return flow.prepare(e, indices, deadline)
                except ExportRefused as refused:
                    return error(refused.status, refused.message, refused.code)

            # one picture per turn and model slot, other requests first (as Everything's batches): a session
            # whose 500 results are all stale (a setting changed) held one of the page's two slots for the
            # whole export, and two such exports held both, every other visitor's click waiting minutes
            for i in indices:
                if time.monotonic() > deadline:
                    return error(413, flow._too_slow(), "export_too_slow")
                kept = await guarded(sid, lambda e, i=i: flow.persist(e, i), request, after_others=True)
                if kept is not None:
                    return kept
            records = await guarded(sid, prepare, request)
            if isinstance(records, Response):
                return records
            try:
                file = await run_in_threadpool(flow.write, entry, records, index is None, deadline)
            except ExportRefused as refused:
                return error(refused.status, refused.message, refused.code)
            except StoreRefusal as refusal:
                return error(refusal.status, refusal.message, refusal.code)
            except FileNotFoundError:  # the session ended (its folder went) while the zip was written
                return expired()
            from .dataset_export import safe_stem

            name = "dataset" if index is None else safe_stem(records[0][0].name)
            try:
                response = _ZipResponse(file, name, lambda: _done(entry), routes.options.export_send_timeout)
            except BaseException:
                file.close()
                raise
            sent = True
            return response
        finally:
            flow.preparing -= 1  # its zip is written (or refused); sending it costs no CPU
            if not sent:
                _done(entry)

    def _done(entry: Entry) -> None:
        store.release_export(entry)
        entry.exporting = False

    @router.get("/session/{sid}/export/session.zip")
    async def export_session(sid: str, request: Request) -> Response:
        return await export(sid, request, None)

    @router.get("/session/{sid}/export/picture/{index}.zip")
    async def export_picture(sid: str, index: int, request: Request) -> Response:
        return await export(sid, request, index)


class _ZipResponse(StreamingResponse):
    """The opened zip, streamed; when it is sent, the client left, or the client stopped reading for
    `send_timeout` seconds (a chunk not taken), the file closes (it has no name: its bytes go) and the session
    may export again. Done here, around the whole response, not in a generator's `finally`: a generator left
    by a hung-up client is closed only when the garbage collector gets to it, and until then the session's
    export stayed "being prepared" (429) and its bytes reserved."""

    def __init__(self, file: IO[bytes], name: str, done, send_timeout: float):
        self.file, self.done, self.send_timeout = file, done, send_timeout
        size = file.seek(0, 2)
        file.seek(0)
        headers = {
            "Cache-Control": "no-store",
            "Content-Disposition": _disposition(name),
            "Content-Length": str(size),
        }
        super().__init__(self._chunks(), media_type="application/zip", headers=headers)

    async def _chunks(self):
        chunk = await run_in_threadpool(self.file.read, CHUNK)
        while chunk:
            following = await run_in_threadpool(self.file.read, CHUNK)
            if not following:  # all read: the session may export again once the client has the last byte
                self._finish()
            yield chunk
            chunk = following

    def _finish(self) -> None:
        if not self.file.closed:
            self.file.close()
            self.done()

    async def __call__(self, scope, receive, send) -> None:
        async def timed_send(message) -> None:
            await asyncio.wait_for(send(message), self.send_timeout)

        try:
            await super().__call__(scope, receive, timed_send)
        except asyncio.TimeoutError:  # a client that stopped reading: the connection closes unfinished
            log.info("export download stopped: the client read nothing for %g s", self.send_timeout)
        finally:
            self._finish()


def _disposition(stem: str) -> str:
    """`attachment; filename="…zip"`, with the UTF-8 name beside an ASCII one when the stem has other letters
    (a header is Latin-1: a raw "日本.zip" there was a 500 and a session whose export never ended)."""
    plain = stem.encode("ascii", "replace").decode().replace("?", "_")
    disposition = f'attachment; filename="{plain}.zip"'
    return disposition if plain == stem else disposition + f"; filename*=UTF-8''{quote(stem)}.zip"
