"""The page's one seam to the engine. `LocalBackend` runs the served models in this process;
a remote implementation (for `app.py --backend URL`) can replace it with the same methods.

Per click the page pays for the objects the edit CHANGED and a label map at PREVIEW size (at most 1024
px): each object's decode (and its logits upscaled to the preview) is kept in a byte-bounded cache
shared by the sessions (`DecodeCache`), keyed by the picture's embedding and that object's prompt, so a
one-point edit on a 16-object picture decodes one object and a no-op (select) decodes none. Full-size
maps are built only for downloads. Every way in goes through the same limits as the API:
`Segmenter.prepare` (formats, the pixel limit before decoding) and the settings' object/point/work
limits, checked by `check` on the would-be prompt BEFORE the page stores an edit.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

import numpy as np
import torch

from segmentation.decoder import upscale_logits
from segmentation.engine import MAX_DECODE_BATCH, Embedding, LabelMap, ObjectDecode, Segmenter
from segmentation.errors import ModelUnavailableError, SegmentationError
from segmentation.masks import (
    Window,
    compose_label_map,
    compose_upscaled,
    object_stats,
    positive_window,
    to_numpy_labels,
)
from segmentation.prompts import Prompt
from segmentation.service import ModelRegistry
from segmentation.settings import Settings

from .state import Picture
from .types import THUMBNAIL_SIDE, FullMap, Preview, PreviewObject  # noqa: F401  (re-exported: the page's types)

MiB = 1024 * 1024


class DecodeCache:
    """What the page keeps between edits, for all sessions together, within `max_bytes`: per object its
    decode (`ObjectDecode`, 256 KB per candidate) and its chosen candidate's logits upscaled to the preview.
    Least recently used first out; entries the request in progress has used are never evicted for it (a
    prompt larger than the budget keeps what fits instead of pushing out its own objects one by one)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max(0, int(max_bytes))
        self._items: OrderedDict[Hashable, tuple[Any, int, int]] = OrderedDict()  # key → (value, bytes, request)
        self._bytes = 0
        self._requests = 0
        self._lock = threading.Lock()

    def request(self) -> int:
        """A new request's stamp: what it touches is kept for it."""
        with self._lock:
            self._requests += 1
            return self._requests

    def get(self, key: Hashable, request: int) -> Any:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items[key] = (item[0], item[1], request)
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: Hashable, value: Any, nbytes: int, request: int) -> bool:
        """Keep `value` if it fits once older requests' entries are evicted; False when it is not kept."""
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            while self._items and self._bytes + nbytes > self.max_bytes:
                oldest_key, (_, size, stamp) = next(iter(self._items.items()))
                if stamp == request:
                    break
                del self._items[oldest_key]
                self._bytes -= size
            if self._bytes + nbytes > self.max_bytes:
                return False
            self._items[key] = (value, nbytes, request)
            self._bytes += nbytes
            return True

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)


class LocalBackend:
    """The served models of this process (a ModelRegistry) behind the few calls the page makes."""

    def __init__(self, registry: ModelRegistry, settings: Settings):
        self.registry = registry
        self.settings = settings
        self._retrying: set[str] = set()
        self._lock = threading.Lock()
        self.decodes = DecodeCache(settings.ui_decode_mb * MiB)

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(self.registry.served)

    @property
    def default(self) -> str:
        return self.registry.default

    def unavailable(self, model: str) -> str | None:
        """Why `model` cannot be used right now (answered at once), or None. A failed model is retried
        in the background, so a click never waits for the hub and the page recovers when weights appear."""
        status = self.registry.status(model)
        if not status.startswith("unavailable"):
            return None
        with self._lock:
            if model not in self._retrying:
                self._retrying.add(model)
                threading.Thread(target=self._retry, args=(model,), daemon=True, name="model-retry").start()
        return status.split(": ", 1)[-1]

    def _retry(self, model: str) -> None:
        try:
            time.sleep(self.registry.retry_after)
            self.registry.get(model)
        except SegmentationError:
            pass
        finally:
            with self._lock:
                self._retrying.discard(model)

    def segmenter(self, model: str) -> Segmenter:
        reason = self.unavailable(model)
        if reason is not None:
            raise ModelUnavailableError(reason, param="model")
        return self.registry.get(model)

    def prepare(self, model: str, source: bytes | str) -> np.ndarray:
        """The upright RGB picture, through the same format and pixel limits as the API."""
        return self.segmenter(model).prepare(source)

    def embed(self, model: str, picture: Picture) -> tuple[str, bool]:
        """Make sure the picture is embedded: (its cache key, whether it was cached already)."""
        embedding, cached = self.embedding(model, picture)
        return embedding.key, cached

    def embedding(self, model: str, picture: Picture) -> tuple[Embedding, bool]:
        """The picture's embedding: from the cache by key, else computed from its source file."""
        segmenter = self.segmenter(model)
        if picture.key:
            cached = segmenter.cached(picture.key)
            if cached is not None:
                return cached, True
        return segmenter.embed_with_info(picture.source)

    def is_embedded(self, model: str, key: str) -> bool:
        """Whether the embedding under `key` is still cached (no hashing, no encode): the strip's "ready"."""
        try:
            return self.segmenter(model).cached(key) is not None
        except SegmentationError:
            return False

    def check(self, model: str, picture: Picture, points: list, labels: list, boxes: list | None) -> None:
        """Would the page accept this prompt? The API's object and point limits, coordinates inside the
        picture and the work limit for a map at preview size, checked from the picture's size alone (no
        model, no embedding): the page calls it before it stores an edit, so a refused edit leaves nothing."""
        self.registry.limits.check_prompt(
            points, labels, boxes, picture.width, picture.height, work_size=picture.preview
        )

    def preview(
        self,
        model: str,
        picture: Picture,
        points: list,
        labels: list,
        plan: list[int],
        *,
        boxes: list | None = None,
        hq_only: bool,
        active: int | None,
    ) -> Preview:
        """One label map at preview size from the objects' kept decodes (decoding only those not kept) and
        their kept upscaled logits; the active object's candidates (when it has one point) as small masks."""
        start = time.perf_counter()
        segmenter = self.segmenter(model)
        embedding, _ = self.embedding(model, picture)
        prompt = self._parse(segmenter, embedding, points, labels, boxes)
        request = self.decodes.request()
        hq = bool(hq_only and segmenter.hq)  # as the engine applies it: without an HQ token it changes nothing
        parts, fresh, timings = self._parts(segmenter, embedding, prompt, hq, request)
        n = len(prompt)
        width, height = picture.preview
        chosen = [min(plan[i], parts[i].count - 1) for i in range(n)]
        keys = [(embedding.key, obj, hq) for obj in prompt.objects]
        map_key = ("map", embedding.key, prompt.objects, hq, tuple(chosen), (height, width))
        kept = self.decodes.get(map_key, request)  # a no-op (select) finds its map as it was: nothing to compose
        if kept is None:  # one object at a time: windows not kept exist only while they are folded into the map
            windows = (
                self._window(embedding, keys[i], parts[i], chosen[i], (height, width), request) for i in range(n)
            )
            label_map = to_numpy_labels(compose_upscaled(windows, n, (height, width)), n)
            kept = (label_map, object_stats(label_map, n))
            self.decodes.put(map_key, kept, label_map.nbytes + 64 * n, request)
        label_map, stats = kept
        total = float(label_map.size)
        objects = tuple(
            PreviewObject(
                value=s.value,
                score=float(parts[s.value - 1].scores[plan[s.value - 1]]),
                percent=100.0 * s.area / total,
                candidate=chosen[s.value - 1],
                candidates=parts[s.value - 1].count,
            )
            for s in stats
        )
        thumbnails: tuple[tuple[np.ndarray, float], ...] = ()
        if active is not None and parts[active].count > 1:
            thumbnails = self._thumbnails(embedding, keys[active], parts[active], (width, height), request)
        timings = {**timings, "page": time.perf_counter() - start}
        return Preview(label_map, objects, thumbnails, fresh == 0, timings, fresh)

    def _parts(
        self, segmenter: Segmenter, embedding: Embedding, prompt: Prompt, hq: bool, request: int
    ) -> tuple[list[ObjectDecode], int, dict[str, float]]:
        """Each object's decode: kept, or decoded now (with the others not kept, batched by layout as the
        engine does, MAX_DECODE_BATCH at a time so no more than one batch's full decode exists besides the
        parts) and kept. Returns the parts in prompt order, how many were decoded, and the decoder's time."""
        keys = [("decode", embedding.key, obj, hq) for obj in prompt.objects]
        parts: list[ObjectDecode | None] = [self.decodes.get(key, request) for key in keys]
        missing = [i for i, part in enumerate(parts) if part is None]
        missing.sort(key=lambda i: prompt.objects[i].layout)  # full batches: the same layout side by side
        seconds = 0.0
        for first in range(0, len(missing), MAX_DECODE_BATCH):
            rows = missing[first : first + MAX_DECODE_BATCH]
            fresh = segmenter.decode(
                embedding, Prompt(objects=tuple(prompt.objects[i] for i in rows)), hq_token_only=hq
            )
            seconds += fresh.timings.get("decoder", 0.0)
            for j, i in enumerate(rows):
                part = fresh.part(j)
                parts[i] = part
                self.decodes.put(keys[i], part, part.nbytes, request)
            del fresh
        return parts, len(missing), ({"decoder": seconds} if missing else {})  # type: ignore[return-value]

    def _window(
        self, embedding: Embedding, key: tuple, part: ObjectDecode, candidate: int, size: tuple[int, int], request: int
    ) -> Window:
        """An object's candidate logits upscaled to the preview (H, W) as `compose_label_map` upscales them (so
        the map is the same, bit for bit), cut to the window where it can claim pixels, kept for the next edit."""
        kept_key = ("preview", *key, candidate, size)
        kept = self.decodes.get(kept_key, request)
        if kept is not None:
            return kept[0]
        with torch.inference_mode():
            low = part.logits[candidate][None].float()
            window = positive_window(upscale_logits(low, embedding.resized_size, size)[0])
        nbytes = 64 if window is None else 64 + window[2].element_size() * window[2].nelement()
        self.decodes.put(kept_key, (window,), nbytes, request)  # a tuple: a window of None is kept too
        return window

    def _thumbnails(
        self, embedding: Embedding, key: tuple, part: ObjectDecode, preview: tuple[int, int], request: int
    ) -> tuple[tuple[np.ndarray, float], ...]:
        width, height = preview
        scale = min(1.0, THUMBNAIL_SIDE / max(width, height))
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        kept_key = ("thumbnails", *key, size)
        kept = self.decodes.get(kept_key, request)
        if kept is not None:
            return kept
        with torch.inference_mode():
            thumbnails = tuple(
                (
                    to_numpy_labels(compose_label_map(part.logits[i][None].float(), embedding.resized_size, size), 1),
                    float(part.scores[i]),
                )
                for i in range(part.count)
            )
        self.decodes.put(kept_key, thumbnails, sum(mask.nbytes for mask, _ in thumbnails), request)
        return thumbnails

    def full(
        self,
        model: str,
        picture: Picture,
        points: list,
        labels: list,
        plan: list[int],
        *,
        boxes: list | None = None,
        hq_only: bool,
    ) -> FullMap:
        """The full-size label map for downloads: the API's map for the same prompt and candidates, bit for bit,
        so the whole prompt is decoded as the API decodes it (its objects batched by layout). The kept
        per-object decodes are not used here: the decoder's batches agree with a lone object's decode only to
        float rounding, and the downloads promise the API's bytes."""
        segmenter = self.segmenter(model)
        embedding, cached = self.embedding(model, picture)
        prompt = self._parse(segmenter, embedding, points, labels, boxes)
        # the one full-size map of a download costs what an API request for it would: the same work limit
        self.registry.limits.check_work(len(prompt), 1, embedding.width, embedding.height)
        decoded = segmenter.decode(embedding, prompt, hq_token_only=hq_only)
        best: LabelMap = segmenter.compose(embedding, decoded, choices=[plan]).best
        return FullMap(best.labels, best.objects, cached, embedding.grid_tokens, prompt.point_count)

    def _parse(self, segmenter: Segmenter, embedding: Embedding, points: list, labels: list, boxes: list | None):
        """The prompt through the API's object and point limits (`registry.limits`, the one place)."""
        limits = self.registry.limits
        return segmenter.parse(
            embedding, points, labels, boxes, max_objects=limits.max_objects, max_points=limits.max_points
        )
