"""While a person labels picture i, picture i + 1's embedding is computed in the background, so moving on
answers from the cache instead of waiting seconds for the image encoder.

Bounded so that it never costs anybody else a click:
* one prefetch wish per session: a newer wish (the person moved elsewhere) replaces the older one, and a
  wish of a session that is gone (closed, expired) is dropped before it runs;
* one prefetch running in the whole process (one background thread), taking a slot of the page's gate only
  once no other request holds or waits for one (`AdmissionGate.admit_after_others`, as Everything's
  batches): other visitors' clicks go first, and at most one slot is ever held by prefetching;
* through the backend only (`embed`), so the page never touches the engine's types.

What it learned (the picture's embedding key) is kept per session and picture so the switch can tell the
picture is embedded without hashing it again; those records go with their session.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

from segmentation.errors import SegmentationError
from segmentation.service import AdmissionGate, OverloadedError

from .remote import BackendError
from .state import Picture

log = logging.getLogger("ui")

MAX_WAIT_FOR_IDLE = 30.0  # seconds a prefetch lets other requests go first before it takes its one slot


@dataclass(frozen=True)
class Wish:
    session: str
    slot: int
    model: str
    picture: Picture


class Prefetcher:
    def __init__(self, backend, gate: AdmissionGate, alive):
        """`alive(session_id) -> bool`: whether the session is still open (its wishes are dropped otherwise)."""
        self.backend = backend
        self.gate = gate
        self.alive = alive
        self._wishes: OrderedDict[str, Wish] = OrderedDict()
        self._keys: dict[tuple[str, int, str], str] = {}  # (session, slot, model) → embedding key
        self._running: Wish | None = None
        self._ready = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self.done = 0  # prefetches that computed or found an embedding (a figure for tests and benchmarks)

    def want(self, session: str, slot: int, model: str, picture: Picture) -> None:
        """Embed `picture` in the background (replacing this session's earlier wish)."""
        with self._ready:
            if (session, slot, model) in self._keys:
                self._wishes.pop(session, None)
                return
            self._wishes[session] = Wish(session, slot, model, picture)
            self._wishes.move_to_end(session)
            if self._thread is None or not self._thread.is_alive():  # first wish, or serving again after a stop
                self._stopped = False
                self._thread = threading.Thread(target=self._run, daemon=True, name="prefetch")
                self._thread.start()
            self._ready.notify()

    def drop(self, session: str) -> None:
        """The person moved elsewhere or left: forget the session's wish not yet started."""
        with self._ready:
            self._wishes.pop(session, None)

    def key(self, session: str, slot: int, model: str) -> str | None:
        """The embedding key a prefetch found for this picture, if any."""
        with self._ready:
            return self._keys.get((session, slot, model))

    def running(self, session: str) -> int | None:
        """The slot whose embedding is being prefetched for `session` now, if any."""
        wish = self._running
        return wish.slot if wish is not None and wish.session == session else None

    def stop(self) -> None:
        """The server is stopping: no new prefetch starts; the one running (if any) is waited for a moment."""
        with self._ready:
            self._stopped = True
            self._wishes.clear()
            self._ready.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=10)

    def _next(self) -> Wish | None:
        with self._ready:
            while not self._stopped:
                for sid in [s for s in self._wishes if not self.alive(s)]:
                    del self._wishes[sid]
                for known in [k for k in self._keys if not self.alive(k[0])]:
                    del self._keys[known]
                if self._wishes:
                    self._running = self._wishes.popitem(last=False)[1]
                    return self._running
                self._ready.wait(timeout=5.0)
            return None

    def _run(self) -> None:
        while (wish := self._next()) is not None:
            try:
                with self.gate.admit_after_others(max_wait=MAX_WAIT_FOR_IDLE):
                    if not self.alive(wish.session):
                        continue
                    key, _ = self.backend.embed(wish.model, wish.picture)
                with self._ready:
                    if self.alive(wish.session):
                        self._keys[(wish.session, wish.slot, wish.model)] = key
                    self.done += 1
            except (SegmentationError, BackendError, OverloadedError, OSError, ValueError) as failure:
                log.info("prefetch skipped: %s", type(failure).__name__)  # the switch embeds it as before
            except Exception:  # a background job must never die: the next wish still runs
                log.exception("prefetch failed")
            finally:
                self._running = None
