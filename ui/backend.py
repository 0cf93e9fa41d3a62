"""The page's one seam to the engine. `LocalBackend` runs the served models in this process;
a remote implementation (for `app.py --backend URL`) can replace it with the same methods.

Per click the page pays for a decode and a label map at PREVIEW size (at most 1024 px): full-size maps
are built only for downloads. Every way in goes through the same limits as the API: `Segmenter.prepare`
(formats, the pixel limit before decoding) and `Segmenter.parse` with the settings' object/point limits.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import torch

from segmentation.engine import Decoded, Embedding, LabelMap, Segmenter
from segmentation.errors import ModelUnavailableError, SegmentationError
from segmentation.masks import compose_label_map, object_stats, to_numpy_labels
from segmentation.service import ModelRegistry
from segmentation.settings import Settings

from .state import Picture
from .types import THUMBNAIL_SIDE, FullMap, Preview, PreviewObject  # noqa: F401  (re-exported: the page's types)

KEEP_DECODED_BYTES = 4 * 1024 * 1024  # a session keeps its last decode (to switch candidates) only below this


class LocalBackend:
    """The served models of this process (a ModelRegistry) behind the few calls the page makes."""

    def __init__(self, registry: ModelRegistry, settings: Settings):
        self.registry = registry
        self.settings = settings
        self._retrying: set[str] = set()
        self._lock = threading.Lock()

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
        reuse: Decoded | None = None,
    ) -> Preview:
        """Decode (or reuse) and compose one label map at preview size; candidates of the active object
        (when it has one point) as small masks."""
        start = time.perf_counter()
        segmenter = self.segmenter(model)
        embedding, _ = self.embedding(model, picture)
        prompt = self._parse(segmenter, embedding, points, labels, boxes)
        decoded = segmenter.decode(embedding, prompt, hq_token_only=hq_only, reuse=reuse)
        reused = decoded is reuse
        if not reused:
            decoded = decoded.on_host()
        n = len(prompt)
        width, height = picture.preview
        logits = decoded.logits.float()
        with torch.inference_mode():
            chosen = logits[torch.arange(n), torch.as_tensor(plan)]
            label_map = to_numpy_labels(compose_label_map(chosen, embedding.resized_size, (height, width)), n)
        total = float(label_map.size)
        objects = tuple(
            PreviewObject(
                value=s.value,
                score=float(decoded.scores[s.value - 1, plan[s.value - 1]]),
                percent=100.0 * s.area / total,
                candidate=min(plan[s.value - 1], decoded.counts[s.value - 1] - 1),
                candidates=decoded.counts[s.value - 1],
            )
            for s in object_stats(label_map, n)
        )
        thumbnails: tuple[tuple[np.ndarray, float], ...] = ()
        if active is not None and decoded.counts[active] > 1:
            scale = min(1.0, THUMBNAIL_SIDE / max(width, height))
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            with torch.inference_mode():
                thumbnails = tuple(
                    (
                        to_numpy_labels(compose_label_map(logits[active, i][None], embedding.resized_size, size), 1),
                        float(decoded.scores[active, i]),
                    )
                    for i in range(decoded.counts[active])
                )
        timings = {**decoded.timings, "page": time.perf_counter() - start}
        return Preview(label_map, objects, thumbnails, decoded, reused, timings)

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
        reuse: Decoded | None = None,
    ) -> FullMap:
        """The full-size label map for downloads (the API's map for the same prompt and candidates)."""
        segmenter = self.segmenter(model)
        embedding, cached = self.embedding(model, picture)
        prompt = self._parse(segmenter, embedding, points, labels, boxes)
        # the one full-size map of a download costs what an API request for it would: the same work limit
        self.registry.limits.check_work(len(prompt), 1, embedding.width, embedding.height)
        decoded = segmenter.decode(embedding, prompt, hq_token_only=hq_only, reuse=reuse)
        best: LabelMap = segmenter.compose(embedding, decoded, choices=[plan]).best
        return FullMap(best.labels, best.objects, cached, embedding.grid_tokens, prompt.point_count)

    def _parse(self, segmenter: Segmenter, embedding: Embedding, points: list, labels: list, boxes: list | None):
        """The prompt through the API's object and point limits (`registry.limits`, the one place)."""
        limits = self.registry.limits
        return segmenter.parse(
            embedding, points, labels, boxes, max_objects=limits.max_objects, max_points=limits.max_points
        )

    @staticmethod
    def keepable(decoded: Decoded | None) -> Decoded | None:
        """A decode small enough to keep in a session (a few objects), else None."""
        if decoded is None:
            return None
        size = decoded.logits.element_size() * decoded.logits.nelement()
        return decoded if size <= KEEP_DECODED_BYTES else None
