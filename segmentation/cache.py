"""A byte-bounded, thread-safe LRU for image embeddings, with single-flight computation.

Single-flight: when several callers ask for the same missing key at once, one runs the
(seconds-long) encoder and the others wait for its result instead of encoding again.

Aliases: a second name for an entry (the engine links the digest of a picture's encoded
bytes to the entry keyed by its decoded pixels), so a picture sent again as the same file
is found without decoding it.

Two tiers, for accelerators: at most `device_bytes` of the entries stay where they were
computed (GPU memory); less recently used ones are spilled with `to_host` (host memory) and
brought back with `to_device` on their next hit. `max_bytes` bounds both tiers together.
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
    device_bytes: int = 0  # of `bytes`, how many are on the device tier
    spills: int = 0  # moves to host memory


class EmbeddingCache(Generic[V]):
    """LRU bounded by the sum of the values' `nbytes`.

    A value larger than the whole bound is returned to its caller but not kept.
    """

    def __init__(
        self,
        max_bytes: int,
        *,
        device_bytes: int | None = None,
        to_host: Callable[[V], V] | None = None,
        to_device: Callable[[V], V] | None = None,
        max_aliases: int = 4096,
    ):
        if max_bytes < 0 or (device_bytes is not None and device_bytes < 0):
            raise ValueError("cache bounds must be >= 0")
        if device_bytes is not None and (to_host is None or to_device is None):
            raise ValueError("a device tier needs both to_host and to_device")
        self.max_bytes = int(max_bytes)
        self.device_bytes = device_bytes
        self._to_host, self._to_device = to_host, to_device
        self._entries: OrderedDict[Hashable, V] = OrderedDict()
        self._on_device: OrderedDict[Hashable, int] = OrderedDict()  # LRU of device-resident keys → size
        self._device_used = 0
        self._in_flight: dict[Hashable, Future] = {}
        self._aliases: OrderedDict[Hashable, Hashable] = OrderedDict()  # alias → key, LRU
        self.max_aliases = max_aliases
        self._bytes = 0
        self._hits = self._misses = self._evictions = self._spills = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> V | None:
        """The value for `key` (marking it recently used), or None; counts a hit or a miss."""
        with self._lock:
            if key not in self._entries:
                self._misses += 1
                return None
            self._hits += 1
            return self._touch(key)

    def get_by_alias(self, alias: Hashable) -> V | None:
        """The entry `alias` was linked to, if both are still here. Counts a hit when found and
        nothing otherwise: the caller then asks for the entry's own key, which counts."""
        with self._lock:
            key = self._aliases.get(alias)
            if key is None or key not in self._entries:
                return None
            self._aliases.move_to_end(alias)
            self._hits += 1
            return self._touch(key)

    def link(self, alias: Hashable, key: Hashable) -> None:
        """Make `alias` a second name for `key` (the least recently used aliases are forgotten first)."""
        with self._lock:
            self._aliases[alias] = key
            self._aliases.move_to_end(alias)
            while len(self._aliases) > self.max_aliases:
                self._aliases.popitem(last=False)

    def get_or_compute(self, key: Hashable, compute: Callable[[], V]) -> tuple[V, bool]:
        """(value, was_cached). Concurrent callers of one missing key share one `compute()`.

        If `compute` raises, every waiting caller gets the exception and nothing is stored.
        """
        with self._lock:
            if key in self._entries:
                self._hits += 1
                return self._touch(key), True
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

    def _touch(self, key: Hashable) -> V:
        """Mark `key` most recently used; bring it back to the device tier if it was spilled."""
        self._entries.move_to_end(key)
        value = self._entries[key]
        if self.device_bytes is None:
            return value
        if key in self._on_device:
            self._on_device.move_to_end(key)
            return value
        value = self._to_device(value)
        self._entries[key] = value
        self._mark_on_device(key, int(value.nbytes))
        return value

    def _mark_on_device(self, key: Hashable, size: int) -> None:
        self._on_device[key] = size
        self._device_used += size
        while self._device_used > self.device_bytes and len(self._on_device) > 1:
            spilled, spilled_size = self._on_device.popitem(last=False)
            self._device_used -= spilled_size
            self._entries[spilled] = self._to_host(self._entries[spilled])
            self._spills += 1

    def _forget(self, key: Hashable) -> V:
        value = self._entries.pop(key)
        self._bytes -= int(value.nbytes)
        size = self._on_device.pop(key, None)
        if size is not None:
            self._device_used -= size
        return value

    def _store(self, key: Hashable, value: V) -> None:
        size = int(value.nbytes)
        if key in self._entries:
            self._forget(key)
        if size > self.max_bytes:
            return
        self._entries[key] = value
        self._bytes += size
        if self.device_bytes is not None:
            self._mark_on_device(key, size)
        while self._bytes > self.max_bytes:
            self._forget(next(iter(self._entries)))
            self._evictions += 1

    def shed(self, fraction: float = 0.5) -> int:
        """Drop the least recently used `fraction` of the bytes (after an out-of-memory); returns bytes freed."""
        with self._lock:
            target = self._bytes * (1.0 - fraction)
            freed = 0
            while self._entries and self._bytes > target:
                freed += int(self._forget(next(iter(self._entries))).nbytes)
                self._evictions += 1
            return freed

    def clear(self) -> None:
        with self._lock:
            self._evictions += len(self._entries)
            self._entries.clear()
            self._on_device.clear()
            self._aliases.clear()
            self._bytes = self._device_used = 0

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
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                entries=len(self._entries),
                bytes=self._bytes,
                max_bytes=self.max_bytes,
                device_bytes=self._device_used,
                spills=self._spills,
            )
