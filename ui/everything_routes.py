"""The page's "Everything" button: find every object of the picture, with progress and Cancel.

A run is a background job per session (`EverythingJob`), so no request waits for it: the page starts it,
polls its progress (batches done of all), may cancel it (it stops before the next batch), and when it has
finished asks for its objects to be added to the session. The job holds neither the session's lock nor a
slot of the page's gate for the whole run: it takes a gate slot per batch and starts no batch while a click
is decoding (`segmentation.everything`), so this and other visitors' clicks are answered between batches.

The objects found become ordinary page objects. SAM-HQ's generator keeps one mask per grid point: the
point's best multimask candidate plus the HQ mask, which is exactly what the page decodes for a one-point
object with its first candidate. So each found object is stored as that one include point (exact
coordinates, not rounded), and the page's own decode reproduces the mask the generator kept: it can then be
deleted, refined with more points or a box, and keeps its number like any other object. Hence the page runs
official's `min_mask_region_area` at 0 and refuses more: a cleaned-up mask is no longer its point's decode.

In front of a remote model server (`--backend URL`) a run is one request to the remote API's
segment_everything, whose answer names each object's grid point: no batches to count, so the job reports
`total` 0 (the page shows a progress bar without a value) and Cancel drops the request's answer at once
(the job's thread still waits for it, so a session starts no second run before the first has answered).
"""

from __future__ import annotations

import copy
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from segmentation.errors import SegmentationError
from segmentation.everything_options import EverythingOptions, parse_everything
from segmentation.limits import Limits
from segmentation.service import OverloadedError, give_memory_back

from . import state as st
from .answers import expired, small_json_object
from .remote import BackendError
from .sessions import Entry

log = logging.getLogger("ui")


@dataclass
class EverythingJob:
    model: str
    picture: st.Picture
    hq_only: bool
    options: EverythingOptions
    cancel: threading.Event = field(default_factory=threading.Event)
    done: int = 0
    kept: int = 0
    state: str = "running"  # running, finished, cancelled, failed, applied
    message: str = ""
    points: list[list[float]] = field(default_factory=list)  # the grid points of the masks kept, best first
    thread: threading.Thread | None = None
    session: str = ""  # its session's id: the job stops when the session is gone
    remote: bool = False  # one request to a remote API: no batches, Cancel drops its answer

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "done": self.done,
            "total": 0 if self.remote else self.options.batches,
            "kept": self.kept,
            "found": len(self.points) if self.state in ("finished", "applied") else None,
            "message": self.message,
        }


def add_found_objects(session: st.Session, points: list[list[float]]) -> int:
    """Each point becomes a new one-point object (first candidate), after the objects already prompted; empty
    objects go. The first found one becomes active. Returns how many were added."""
    session.objects = [obj for obj in session.objects if obj.prompted]
    first = len(session.objects)
    for x, y in points:
        session.objects.append(st.ObjectPrompt(session.next_number, points=[[x, y]], labels=[1], edits=[("point",)]))
        session.next_number += 1
    if not session.objects:
        session.objects = [st.ObjectPrompt(session.next_number)]
        session.next_number += 1
    session.active = min(first, len(session.objects) - 1)
    st.changed(session)
    return len(points)


class EverythingRoutes:
    """The jobs of the sessions, one at most per session, and at most `MAX_RUNNING` running at once in the
    process (each holds a thread; past it a 429): a job whose session is gone stops before its next batch,
    and its record goes when the next job starts."""

    MAX_RUNNING = 2

    def __init__(self, routes):
        self.routes = routes
        self.jobs: dict[str, EverythingJob] = {}
        self._lock = threading.Lock()

    def start(self, entry: Entry, body: dict[str, Any]) -> dict[str, Any]:
        session = entry.session
        if session.picture is None:
            raise ValueError("Upload a picture first, or pick one of the examples.")
        backend = self.routes.backend
        remote = not hasattr(backend, "segmenter")
        options = parse_everything(body or True)  # the page sends points_per_side; any official knob is accepted
        if options.min_mask_region_area:  # a found object is its grid point's decode, which the page refines
            raise ValueError("The page finds objects without the small-region clean-up (min_mask_region_area 0).")
        picture = session.picture
        _limits(backend).check_everything_work(options.grid_points, picture.width, picture.height)
        with self._lock:
            store = self.routes.store
            self.jobs = {sid: job for sid, job in self.jobs.items() if sid in store or _busy(job)}
            running = self.jobs.get(session.id)
            if running is not None and running.state == "running":
                raise ValueError("Everything is already running for this picture: wait for it or press Cancel.")
            if running is not None and _busy(running):
                raise ValueError("The cancelled run of Everything has not stopped yet: try again in a moment.")
            if sum(_busy(job) for job in self.jobs.values()) >= self.MAX_RUNNING:
                raise OverloadedError("Everything is running for other visitors right now: try again in a minute.")
            job = EverythingJob(session.model, picture, session.hq_only, options, session=session.id, remote=remote)
            self.jobs[session.id] = job
        job.thread = threading.Thread(target=self._run, args=(job,), daemon=True, name="everything")
        job.thread.start()
        return job.status()

    def _run(self, job: EverythingJob) -> None:
        if job.remote:
            self._run_remote(job)
            return
        from segmentation.everything import Cancelled, Progress, generate  # the engine: a local backend only

        backend = self.routes.backend
        try:
            segmenter = backend.segmenter(job.model)
            embedding, _ = backend.embedding(job.model, job.picture)

            def progress(report: Progress) -> None:
                job.done, job.kept = report.done, report.kept

            found = generate(
                segmenter,
                embedding,
                job.options,
                hq_token_only=job.hq_only,
                batch_context=self.routes.gate.admit_after_others,
                progress=progress,
                cancelled=lambda: job.cancel.is_set() or job.session not in self.routes.store,
            )
            job.points = [list(mask.point) for mask in found.masks]
            job.state = "finished"
        except Cancelled:
            job.state = "cancelled"
        except SegmentationError as error:
            job.state, job.message = "failed", error.message
        except Exception:  # a job must end with a state the page can show
            log.exception("segment everything failed")
            job.state, job.message = "failed", "Finding the objects failed on the server; try again."
        finally:
            give_memory_back()  # a run's batches leave freed memory the allocator would otherwise keep

    def _run_remote(self, job: EverythingJob) -> None:
        """The run as one request to the remote API; an answer that comes after Cancel is dropped."""
        try:
            points = self.routes.backend.everything(
                job.model, job.picture, job.options.as_dict(), hq_only=job.hq_only, grid_points=job.options.grid_points
            )
            outcome, message = "finished", ""
        except BackendError as error:
            points, outcome, message = [], "failed", error.message
        except Exception:  # a job must end with a state the page can show
            log.exception("segment everything on the remote failed")
            points, outcome, message = [], "failed", "Finding the objects failed; try again."
        with self._lock:
            if job.state != "running":  # cancelled meanwhile: nobody wants this answer
                return
            if outcome == "finished":
                job.points, job.done, job.kept = points, 1, len(points)
            job.state, job.message = outcome, message

    def status(self, entry: Entry) -> dict[str, Any]:
        job = self.jobs.get(entry.session.id)
        return job.status() if job is not None else {"state": "none", "done": 0, "total": 0, "kept": 0}

    def cancel(self, entry: Entry) -> dict[str, Any]:
        job = self.jobs.get(entry.session.id)
        if job is not None and job.state == "running":
            job.cancel.set()
            if job.remote:  # one request, no batch to stop after: its answer is dropped
                with self._lock:
                    if job.state == "running":
                        job.state = "cancelled"
        return self.status(entry)

    def apply(self, entry: Entry) -> dict[str, Any]:
        """Add a finished run's objects to the session (once), then the new view."""
        session = entry.session
        job = self.jobs.get(session.id)
        if job is None or job.state != "finished":
            raise ValueError("There is no finished run of Everything to add.")
        if (job.model, job.hq_only) != (session.model, session.hq_only) or (
            session.picture is None or session.picture.source != job.picture.source
        ):
            job.state = "applied"
            raise ValueError("The picture or the settings changed while Everything ran: press Everything again.")
        job.state = "applied"
        # on a draft, as any edit: the objects must pass the limits before the session stores them
        max_objects = _limits(self.routes.backend).max_objects
        room = max_objects - len(session.prompted())
        points = job.points[: max(0, room)]
        draft = copy.deepcopy(session)
        added = add_found_objects(draft, points)
        prompted = draft.prompted()
        if prompted:
            self.routes.backend.check(
                draft.model,
                draft.picture,
                [o.points for o in prompted],
                [o.labels for o in prompted],
                [o.box for o in prompted] if any(o.box for o in prompted) else None,
            )
        preview, status = self.routes.render(entry, draft)
        vars(session).update(vars(draft))
        found = f"Everything found {added} object(s)" if added else "Everything found no object past the filters"
        if added < len(job.points):
            found += f" (the {added} best: a picture holds at most {max_objects} objects)"
        return self.routes.view(entry, preview, f"{found} · {status}")


def _limits(backend) -> Limits:
    """The limits the page holds to: this process's API's (local model), or the page's own (remote)."""
    return backend.registry.limits if hasattr(backend, "registry") else backend.limits


def _busy(job: EverythingJob) -> bool:
    """Running, or a remote run cancelled while its thread still waits for the answer: it holds a thread."""
    return job.state == "running" or (job.remote and job.thread is not None and job.thread.is_alive())


def install_everything_routes(router: APIRouter, routes, guarded) -> None:
    """Adds /ui/session/{sid}/everything (POST start, GET progress, DELETE cancel) and …/everything/apply."""
    jobs = EverythingRoutes(routes)
    routes.everything = jobs

    @router.post("/session/{sid}/everything")
    async def start(sid: str, request: Request) -> Response:
        body = await small_json_object(request, 1024, "Everything's settings")
        if isinstance(body, Response):
            return body
        return await guarded(sid, lambda entry: JSONResponse(jobs.start(entry, body)), request)

    @router.get("/session/{sid}/everything")
    async def progress(sid: str) -> Response:
        entry = routes.store.get(sid)
        return expired() if entry is None else JSONResponse(jobs.status(entry))

    @router.delete("/session/{sid}/everything")
    async def cancel(sid: str) -> Response:
        entry = routes.store.get(sid)
        return expired() if entry is None else JSONResponse(jobs.cancel(entry))

    @router.post("/session/{sid}/everything/apply")
    async def apply(sid: str, request: Request) -> Response:
        return await guarded(sid, lambda entry: JSONResponse(jobs.apply(entry)), request)
