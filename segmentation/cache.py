"""A byte-bounded, thread-safe LRU for image embeddings, with single-flight computation.

Single-flight: when several callers ask for the same missing key at once, one runs the
(seconds-long) encoder and the others wait for its result instead of encoding again.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar


class Sized(Protocol):
    @property
    def nbytes(self) -> int: ...


V = TypeVar("V", bound=Sized)


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    evictions: int
    entries: int
    bytes: int
    max_bytes: int


class EmbeddingCache(Generic[V]):
    """LRU bounded by the sum of the values' `nbytes`.

    A value larger than the whole bound is returned to its caller but not kept.
    """

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[Hashable, V] = OrderedDict()
        self._in_flight: dict[Hashable, Future] = {}
        self._bytes = 0
        self._hits = self._misses = self._evictions = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> V | None:
        """The value for `key` (marking it recently used), or None; counts a hit or a miss."""
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return value

    def get_or_compute(self, key: Hashable, compute: Callable[[], V]) -> tuple[V, bool]:
        """(value, was_cached). Concurrent callers of one missing key share one `compute()`.

        If `compute` raises, every waiting caller gets the exception and nothing is stored.
        """
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
                self._hits += 1
                return value, True
            future = self._in_flight.get(key)
            owner = future is None
            if owner:
                self._misses += 1
                future = Future()
                self._in_flight[key] = future
            else:
                self._hits += 1  # served without running the encoder
        if not owner:
            return future.result(), True
        try:
            value = compute()
        except BaseException as error:
            with self._lock:
                del self._in_flight[key]
            future.set_exception(error)
            raise
        with self._lock:
            self._store(key, value)
            del self._in_flight[key]
        future.set_result(value)
        return value, False

    def put(self, key: Hashable, value: V) -> None:
        with self._lock:
            self._store(key, value)

    def _store(self, key: Hashable, value: V) -> None:
        size = int(value.nbytes)
        if key in self._entries:
            self._bytes -= int(self._entries.pop(key).nbytes)
        if size > self.max_bytes:
            return
        self._entries[key] = value
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= int(evicted.nbytes)
            self._evictions += 1

    def shed(self, fraction: float = 0.5) -> int:
        """Drop the least recently used `fraction` of the bytes (after an out-of-memory); returns bytes freed."""
        with self._lock:
            target = self._bytes * (1.0 - fraction)
            freed = 0
            while self._entries and self._bytes > target:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= int(evicted.nbytes)
                freed += int(evicted.nbytes)
                self._evictions += 1
            return freed

    def clear(self) -> None:
        with self._lock:
            self._evictions += len(self._entries)
            self._entries.clear()
            self._bytes = 0

    def keys(self) -> list[Hashable]:
        """Keys from least to most recently used."""
        with self._lock:
            return list(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                self._hits, self._misses, self._evictions, len(self._entries), self._bytes, self.max_bytes
            )
