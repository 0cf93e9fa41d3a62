"""What the web layers share: the served models (loaded lazily, once) and one segmentation call.

The HTTP API and the Gradio UI both go through here, so a picture embedded by one is a
cache hit for the other, and both enforce the same limits.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .cache import EmbeddingCache
from .engine import Embedding, LabelMap, ObjectResult, Segmenter, make_cache
from .errors import ModelUnavailableError, SegmentationError, UnknownModelError
from .masks import encode_png, object_stats, resize_nearest
from .models import resolve_device
from .settings import Settings

log = logging.getLogger(__name__)

MiB = 1024 * 1024


class OverloadedError(SegmentationError):
    """Too many requests are already waiting for the model."""

    code = "rate_limit_exceeded"


class ModelRegistry:
    """The served models: each loaded on first use, once, even under concurrent first requests.

    A failed load is remembered with its reason (answered at once) and retried after
    `retry_after` seconds, so a server started offline recovers when the weights appear.
    """

    def __init__(
        self,
        settings: Settings,
        loader: Callable[..., Segmenter] = Segmenter.from_pretrained,
        retry_after: float = 15.0,
    ):
        self.settings = settings
        self.served = settings.served_models
        self._loader = loader
        self.retry_after = retry_after
        device = resolve_device(settings.device)
        self.cache: EmbeddingCache[Embedding] = make_cache(
            device,
            settings.cache_mb * MiB if settings.cache_mb > 0 else None,
            settings.device_cache_mb * MiB if settings.device_cache_mb > 0 else None,
        )
        self._models: dict[str, Segmenter] = {}
        self._failures: dict[str, tuple[float, ModelUnavailableError]] = {}
        self._locks = {name: threading.Lock() for name in self.served}

    @property
    def default(self) -> str:
        return self.settings.model

    def check_served(self, name: str | None) -> str:
        name = name or self.default
        if name not in self.served:
            raise UnknownModelError(
                f"Model {name!r} is not served here. Served models: {', '.join(self.served)}.", param="model"
            )
        return name

    def get(self, name: str | None = None) -> Segmenter:
        """The loaded model, loading it now if needed; raises UnknownModelError / ModelUnavailableError."""
        name = self.check_served(name)
        model = self._models.get(name)
        if model is not None:
            return model
        with self._locks[name]:
            model = self._models.get(name)
            if model is not None:
                return model
            failure = self._failures.get(name)
            if failure and time.monotonic() - failure[0] < self.retry_after:
                raise failure[1]
            try:
                model = self._loader(
                    name,
                    device=self.settings.device,
                    dtype=self.settings.dtype,
                    cache_bytes=self.cache.max_bytes,
                    max_pixels=self.settings.max_pixels,
                    compile=self.settings.compile,
                )
            except ModelUnavailableError as error:
                self._failures[name] = (time.monotonic(), error)
                log.error("%s", error)
                raise
            model.cache = self.cache  # one byte budget across every served model
            self._failures.pop(name, None)
            self._models[name] = model
            return model

    def status(self, name: str) -> str:
        """'loaded', 'not loaded yet', or the reason the last load failed."""
        if name in self._models:
            return "loaded"
        failure = self._failures.get(name)
        return f"unavailable: {failure[1].message}" if failure else "not loaded yet"

    def loaded(self) -> dict[str, Segmenter]:
        return dict(self._models)


class AdmissionGate:
    """Bounds the requests waiting for the model: past `max_waiting`, refuse at once (HTTP 429)."""

    def __init__(self, max_concurrent: int = 1, max_waiting: int = 16):
        self._slots = threading.BoundedSemaphore(max(1, max_concurrent))
        self._max_waiting = max_waiting
        self._waiting = 0
        self._lock = threading.Lock()

    def __enter__(self) -> AdmissionGate:
        with self._lock:
            if self._waiting >= self._max_waiting:
                raise OverloadedError("The server is busy: too many requests are waiting. Retry in a few seconds.")
            self._waiting += 1
        try:
            self._slots.acquire()
        finally:
            with self._lock:
                self._waiting -= 1
        return self

    def __exit__(self, *exc: Any) -> None:
        self._slots.release()


def _resized(label_map: LabelMap, width: int, height: int) -> LabelMap:
    """The map at another size; areas and boxes re-measured so they describe the mask returned."""
    labels = resize_nearest(label_map.labels, width, height)
    stats = object_stats(labels, len(label_map.objects))
    objects = tuple(
        ObjectResult(value=s.value, score=o.score, area=s.area, bbox=s.bbox) for s, o in zip(stats, label_map.objects)
    )
    return LabelMap(labels, objects)


@dataclass(frozen=True)
class SegmentResult:
    model: str
    width: int  # of the returned masks
    height: int
    candidates: tuple[LabelMap, ...]
    embedding_cached: bool
    image_tokens: int
    point_tokens: int
    timings: dict[str, float] = field(default_factory=dict)

    def mask_arrays(self) -> list[np.ndarray]:
        return [candidate.labels for candidate in self.candidates]

    def pngs(self) -> list[bytes]:
        return [encode_png(labels) for labels in self.mask_arrays()]


def segment(
    registry: ModelRegistry,
    *,
    image: Any,
    points: Any,
    labels: Any = None,
    boxes: Any = None,
    model: str | None = None,
    candidates: int = 1,
    hq_token_only: bool = False,
    size: tuple[int, int] | None = None,
) -> SegmentResult:
    """Embed (cached) and segment one request; the label maps come back at `size` if given (nearest)."""
    settings = registry.settings
    segmenter = registry.get(model)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    embedding, cached = segmenter.embed_with_info(image)
    timings["embed"] = time.perf_counter() - start  # decode + encoder, or a cache lookup
    prompt = segmenter.parse(
        embedding, points, labels, boxes, max_objects=settings.max_objects, max_points=settings.max_points
    )
    result = segmenter.segment(embedding, prompt, candidates=candidates, hq_token_only=hq_token_only)
    timings.update(result.timings)
    maps = result.candidates
    width, height = embedding.width, embedding.height
    if size is not None and size != (width, height):
        width, height = size
        maps = tuple(_resized(m, width, height) for m in maps)
    return SegmentResult(
        model=segmenter.model_id,
        width=width,
        height=height,
        candidates=maps,
        embedding_cached=cached,
        image_tokens=embedding.grid_tokens,
        point_tokens=prompt.point_count,
        timings=timings,
    )
