"""Where the page's sessions live: a bounded, expiring store, one folder per session on disk.

A session holds its typed state (`ui.state.Session`, small), the last decode when small, and a folder
with the uploaded file, the preview JPEG and the downloads. Sessions idle for `ttl` seconds, or the least
recently used one past `capacity`, are dropped with their folder: memory and disk stay bounded by
capacity × (a few MB of state + the upload limit + one set of downloads).
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .state import Session


@dataclass
class Entry:
    session: Session
    folder: Path
    lock: threading.Lock = field(default_factory=threading.Lock)  # one edit at a time per session
    decoded: Any = None  # the backend's last decode (opaque here), kept only when small (see LocalBackend.keepable)
    touched: float = field(default_factory=time.monotonic)


class SessionStore:
    def __init__(self, capacity: int = 100, ttl: float = 3600.0, root: str | Path | None = None):
        self.capacity = max(1, capacity)
        self.ttl = ttl
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="samhq-ui-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._lock = threading.Lock()

    def open(self, model: str) -> Entry:
        sid = secrets.token_urlsafe(18)
        folder = self.root / sid
        folder.mkdir()
        entry = Entry(Session(id=sid, model=model), folder)
        with self._lock:
            self._entries[sid] = entry
            dropped = self._expire_locked()
        self._remove(dropped)
        return entry

    def get(self, sid: str) -> Entry | None:
        with self._lock:
            dropped = self._expire_locked()
            entry = self._entries.get(sid)
            if entry is not None:
                entry.touched = time.monotonic()
                self._entries.move_to_end(sid)
        self._remove(dropped)
        return entry

    def drop(self, sid: str) -> None:
        with self._lock:
            entry = self._entries.pop(sid, None)
        self._remove([entry] if entry else [])

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        with self._lock:
            entries = list(self._entries.values())
            self._entries.clear()
        self._remove(entries)
        shutil.rmtree(self.root, ignore_errors=True)

    def _expire_locked(self) -> list[Entry]:
        now = time.monotonic()
        dropped = []
        while self._entries:
            sid, entry = next(iter(self._entries.items()))
            if len(self._entries) > self.capacity or now - entry.touched > self.ttl:
                dropped.append(self._entries.pop(sid))
            else:
                break
        return dropped

    @staticmethod
    def _remove(entries: list[Entry]) -> None:
        for entry in entries:
            shutil.rmtree(entry.folder, ignore_errors=True)
