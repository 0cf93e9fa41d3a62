"""Where the page's sessions live: a bounded, expiring store, one folder per session on disk.

A session holds its typed state (`ui.state.Session`, small), the last decode when small, and a folder
with the uploaded file, the preview JPEG and the downloads. The bounds, so that no stranger can stall or
empty the page (issue 21):

* per client (`ui.clients`): at most `per_client` sessions. Past it, the client's own least recently used
  session goes if it has been idle for `recent` seconds; otherwise the open is refused (429). One
  client's flood never pushes out anybody else's session.
* in total: at most `capacity` sessions. Past it, the least recently used session goes only if it has been
  idle for `recent` seconds; otherwise the open is refused (503): someone active is never evicted.
* on disk: all folders together within `disk_bytes`. A picture that does not fit makes room from idle
  sessions the same way, or is refused (503). An upload still arriving counts too: its bytes are reserved
  chunk by chunk as they come (`reserve`), and a session receives one upload at a time (`uploading`).
* in time: idle for `ttl` seconds, a session goes with its folder.

Folders live under one run folder per process (`<root>/run-*`, with a lock file `run-*.lock` beside it
held for the process's life, taken BEFORE the folder is made): at start, the run folders of processes that are
gone (killed, crashed) are removed, whatever their age; at shutdown (`close`), this run's folder goes.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .state import Session

DEFAULT_ROOT = Path(tempfile.gettempdir()) / "samhq-ui-sessions"


class StoreRefusal(Exception):
    """An open or an upload the store cannot take now: `status` and a message in words for the page."""

    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


@dataclass
class Entry:
    session: Session
    folder: Path
    client: str = ""
    # one request of a session at a time: waited for in the event loop, so a waiting request holds no thread
    turn: asyncio.Lock = field(default_factory=asyncio.Lock)
    pending: int = 0  # requests of this session running or waiting for their turn
    touched: float = field(default_factory=time.monotonic)
    disk: int = 0  # bytes in its folder when last measured
    receiving: int = 0  # bytes of an upload still arriving, reserved against the disk budget
    uploading: bool = False  # an upload is in flight (one at a time per session)
    exporting: bool = False  # a dataset export is being written or sent (one at a time per session)
    export_bytes: int = 0  # bytes of that export's zip, reserved against the disk budget as they are written

    @property
    def held(self) -> int:
        """Its bytes against the disk budget but its export's: its folder and an upload arriving. An export's
        zip is counted apart (`SessionStore._exports`): its nameless file outlives a session closed while it
        is sent, and its bytes must count until it is closed."""
        return self.disk + self.receiving


class SessionStore:
    def __init__(
        self,
        capacity: int = 100,
        ttl: float = 3600.0,
        root: str | Path | None = None,
        per_client: int = 8,
        disk_bytes: int = 2048 * 2**20,
        recent: float = 600.0,
    ):
        self.capacity = max(1, capacity)
        self.per_client = max(1, per_client)
        self.ttl = ttl
        self.disk_bytes = disk_bytes
        self.recent = recent  # a session touched this recently is never evicted for someone else
        parent = Path(root) if root else DEFAULT_ROOT
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_runs(parent)
        self.root, self._run_lock = _new_run(parent)
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._exports = 0  # bytes of every export zip still open, its session open or not (`reserve_export`)
        self._lock = threading.Lock()

    def open(self, model: str, client: str = "") -> Entry:
        """A new session for `client`, or StoreRefusal (see the module docstring)."""
        now = time.monotonic()
        refusal = entry = None
        with self._lock:
            dropped = self._expire_locked(now)
            own = [e for e in self._entries.values() if e.client == client]
            if len(own) >= self.per_client:
                if now - own[0].touched <= self.recent:
                    refusal = StoreRefusal(
                        429,
                        f"Too many pages are open from your address ({self.per_client}): close another tab of "
                        "this page, or try again in a few minutes.",
                        "too_many_sessions",
                    )
                else:
                    dropped.append(self._entries.pop(own[0].session.id))
            if refusal is None and len(self._entries) >= self.capacity:
                oldest = next(iter(self._entries.values()))
                if now - oldest.touched <= self.recent:
                    refusal = StoreRefusal(
                        503,
                        "The page is serving as many visitors as it can right now: try again in a few minutes.",
                        "server_busy",
                    )
                else:
                    dropped.append(self._entries.pop(oldest.session.id))
            if refusal is None:
                sid = secrets.token_urlsafe(18)
                (self.root / sid).mkdir(parents=True)  # parents: a store closed by a stop may serve again
                entry = Entry(Session(id=sid, model=model), self.root / sid, client=client)
                self._entries[sid] = entry
        self._remove(dropped)
        if refusal is not None:
            raise refusal
        return entry

    def get(self, sid: str) -> Entry | None:
        with self._lock:
            dropped = self._expire_locked(time.monotonic())
            entry = self._entries.get(sid)
            if entry is not None:
                entry.touched = time.monotonic()
                self._entries.move_to_end(sid)
        self._remove(dropped)
        return entry

    def make_room(self, entry: Entry, incoming: int) -> None:
        """Before `entry` writes about `incoming` bytes more: evict idle sessions to fit the disk budget, or
        refuse (StoreRefusal 503) when only recently active ones hold the space."""
        now = time.monotonic()
        dropped = []
        try:
            with self._lock:
                others = sum(e.held for e in self._entries.values() if e is not entry) + self._exports
                self._fit_locked(entry, others + incoming, now, dropped)
        finally:
            self._remove(dropped)

    @contextmanager
    def _fitting(self, entry: Entry, incoming: int):
        """Make room for `incoming` more bytes of `entry` (or StoreRefusal 503), then let the caller count them
        under the same lock; sessions dropped to make room are removed after it is let go."""
        now = time.monotonic()
        dropped = []
        try:
            with self._lock:
                total = sum(e.held for e in self._entries.values()) + self._exports + incoming
                self._fit_locked(entry, total, now, dropped)
                yield
        finally:
            self._remove(dropped)

    def reserve(self, entry: Entry, incoming: int) -> None:
        """`incoming` more bytes of `entry`'s upload are about to be written: counted against the disk budget
        now (with the session's own folder, which stays until the new picture replaces it), making room from
        idle sessions as `make_room` does, or StoreRefusal 503. `release` ends the reservation."""
        with self._fitting(entry, incoming):
            entry.receiving += incoming

    def release(self, entry: Entry) -> None:
        """The upload ended: its file (if kept) is counted by `measure` from now on."""
        with self._lock:
            entry.receiving = 0

    def reserve_export(self, entry: Entry, incoming: int) -> None:
        """`incoming` more bytes of `entry`'s export zip (a nameless file in its folder, which `measure` does
        not see) are about to be written: counted as an upload's are (`reserve`), or StoreRefusal 503."""
        with self._fitting(entry, incoming):
            entry.export_bytes += incoming
            self._exports += incoming

    def release_export(self, entry: Entry) -> None:
        """The export's file is closed (gone): its bytes no longer count."""
        with self._lock:
            self._exports -= entry.export_bytes
            entry.export_bytes = 0

    def _fit_locked(self, entry: Entry, total: int, now: float, dropped: list[Entry]) -> None:
        """Evict idle sessions (never `entry`, never one receiving an upload) until `total` fits, or refuse."""
        while total > self.disk_bytes:
            idle = next(
                (
                    e
                    for e in self._entries.values()
                    if e is not entry and not e.receiving and not e.exporting and now - e.touched > self.recent
                ),
                None,
            )
            if idle is None:
                raise StoreRefusal(
                    503,
                    "The server's space for pictures is taken by other visitors right now: try again in a "
                    "few minutes, or with a smaller picture.",
                    "disk_full",
                )
            dropped.append(self._entries.pop(idle.session.id))
            total -= idle.disk

    def measure(self, entry: Entry) -> int:
        """Bytes now in the session's folder (its upload, preview and downloads)."""
        total = 0
        for path in entry.folder.rglob("*"):
            try:
                total += path.stat().st_size if path.is_file() else 0
            except OSError:
                pass
        entry.disk = total
        return total

    @property
    def disk(self) -> int:
        return sum(entry.held for entry in list(self._entries.values())) + self._exports

    def drop(self, sid: str) -> None:
        with self._lock:
            entry = self._entries.pop(sid, None)
        self._remove([entry] if entry else [])

    def __contains__(self, sid: object) -> bool:
        """Whether the session is open (without touching it, unlike `get`)."""
        return sid in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        """Every session and this run's folder go (the server is stopping)."""
        with self._lock:
            entries = list(self._entries.values())
            self._entries.clear()
        self._remove(entries)
        shutil.rmtree(self.root, ignore_errors=True)
        _lock_of(self.root).unlink(missing_ok=True)
        self._run_lock.close()

    def _expire_locked(self, now: float) -> list[Entry]:
        dropped = []
        while self._entries:
            sid, entry = next(iter(self._entries.items()))
            if now - entry.touched > self.ttl:
                dropped.append(self._entries.pop(sid))
            else:
                break
        return dropped

    @staticmethod
    def _remove(entries: list[Entry]) -> None:
        for entry in entries:
            shutil.rmtree(entry.folder, ignore_errors=True)


def remove_stale_runs(parent: Path) -> list[Path]:
    """Remove the run folders under `parent` whose process is gone: their lock file is missing or not held.
    A live process takes its lock before it makes its folder (`_new_run`), so no age rule is needed."""
    removed = []
    for run in parent.glob("run-*"):
        if run.suffix == ".lock":
            if not run.with_suffix("").exists():  # a process that died between its lock and its folder
                _remove_if_free(run, None)
            continue
        if run.is_dir() and _remove_if_free(_lock_of(run), run):
            removed.append(run)
    return removed


def _remove_if_free(lock: Path, run: Path | None) -> bool:
    """Remove `run` and its `lock` unless a live process holds the lock; the lock is held while removing."""
    try:
        handle = open(lock, "r+")  # noqa: SIM115
    except FileNotFoundError:
        handle = None  # no lock at all: not a live run's folder
    try:
        if handle is not None:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by a live process: OSError
    except OSError:
        handle.close()
        return False
    try:
        if run is not None:
            shutil.rmtree(run, ignore_errors=True)
        lock.unlink(missing_ok=True)
    finally:
        if handle is not None:
            handle.close()
    return True


def _new_run(parent: Path):
    """A new run folder and its lock, held: the lock file is made and locked FIRST, then the folder, so a
    folder without a held lock is always a dead process's. A lock removed by another start's cleanup between
    our open and our flock (another file now, or none) is given up and a new name tried."""
    while True:
        name = f"run-{secrets.token_hex(6)}"
        lock = parent / f"{name}.lock"
        try:
            handle = open(lock, "x")  # noqa: SIM115  (held for the process's life)
        except FileExistsError:
            continue
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.stat(lock).st_ino != os.fstat(handle.fileno()).st_ino:
                raise FileNotFoundError(lock)
            (parent / name).mkdir()
        except OSError:
            handle.close()
            continue
        return parent / name, handle


def _lock_of(run: Path) -> Path:
    """`run-x.lock` beside the run folder `run-x` (inside it, it would look like a session)."""
    return run.with_name(run.name + ".lock")
