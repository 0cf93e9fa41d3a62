"""`RemoteBackend`: the page's seam to the engine when the segmentation runs elsewhere (`app.py --backend URL`).

The same calls as `LocalBackend`, answered by a remote API (ours, or the Ray Serve application) through
our client (`segmentation.client`: httpx, no torch), so a page process holds no model. Each click sends the
picture's bytes: the remote server finds its embedding by their digest, so only the first click pays for
the encoder. The per-click map comes back at PREVIEW size (`size=`), the downloads' map at full size;
a one-point object's three candidates come from `n=3`. The remote's refusals become page messages.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from segmentation.client import SegmentationAPIError, SegmentationClient
from segmentation.images import load_image
from segmentation.schemas import SegmentationResponse
from segmentation.settings import Settings

from .state import Picture
from .types import THUMBNAIL_SIDE, FullMap, Preview, PreviewObject

log = logging.getLogger("ui.remote")


class BackendError(Exception):
    """The remote segmentation server refused or could not be reached: `status` and a message for people."""

    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class RemoteBackend:
    """A remote segmentation API behind the few calls the page makes (see `LocalBackend`)."""

    def __init__(self, url: str, settings: Settings, api_key: str | None = None, timeout: float = 120.0):
        self.url = url.rstrip("/")
        self.settings = settings
        # an explicit key only: the page must not pick up $SAMHQ_API_KEY meant for other clients
        self.client = SegmentationClient(self.url, api_key=api_key or "", timeout=timeout)
        try:
            served = tuple(self.client.models())
        except (SegmentationAPIError, httpx.HTTPError) as error:
            log.warning("could not list the models of %s (%s): offering %s", self.url, error, settings.model)
            served = ()
        self._models = served or (settings.model,)
        self._default = settings.model if settings.model in self._models else self._models[0]

    @property
    def models(self) -> tuple[str, ...]:
        return self._models

    @property
    def default(self) -> str:
        return self._default

    def unavailable(self, model: str) -> str | None:
        """Unknown ahead of a call here: the remote's answer to each click says it (a 503 becomes a message)."""
        return None

    def prepare(self, model: str, source: bytes | str) -> np.ndarray:
        """The upright RGB picture, through the same format and pixel limits as the API (decoded here, for
        the preview and the cut-out; the remote applies its own limits too)."""
        return load_image(source, self.settings.max_pixels)

    def embed(self, model: str, picture: Picture) -> tuple[str, bool]:
        """Have the remote embed the picture (one cheap call: a centre point, a 1×1 answer)."""
        centre = [[[picture.width / 2, picture.height / 2]]]
        response = self._segment(model, picture, centre, None, None, n=1, size="1x1", hq_only=False)
        return hashlib.sha256(_bytes(picture)).hexdigest(), _cached(response)

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
        reuse: Any = None,
    ) -> Preview:
        """One label map at preview size. The API's i-th map gives every object its i-th candidate, so the
        map shown uses the one-point objects' shared choice (their first candidate when they differ)."""
        start = time.perf_counter()
        ambiguous = _ambiguous(points, boxes)
        width, height = picture.preview
        n = 3 if any(ambiguous) else 1
        response = self._segment(model, picture, points, labels, boxes, n=n, size=f"{width}x{height}", hq_only=hq_only)
        shared = min(_shared_choice(plan, ambiguous), len(response.data) - 1)
        chosen = response.data[shared]
        label_map = chosen.to_array()
        total = float(label_map.size)
        objects = tuple(
            PreviewObject(
                value=s.value,
                score=s.score,
                percent=100.0 * s.area / total,
                candidate=shared if ambiguous[s.value - 1] else 0,
                candidates=len(response.data) if ambiguous[s.value - 1] else 1,
            )
            for s in chosen.segments
        )
        thumbnails: tuple[tuple[np.ndarray, float], ...] = ()
        if active is not None and ambiguous[active] and len(response.data) > 1:
            scale = min(1.0, THUMBNAIL_SIDE / max(width, height))
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            thumbnails = tuple(
                (_thumbnail(mask.to_array() == active + 1, size), float(mask.segments[active].score))
                for mask in response.data
            )
        timings = {"page": time.perf_counter() - start}
        return Preview(label_map, objects, thumbnails, None, False, timings)

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
        reuse: Any = None,
    ) -> FullMap:
        """The full-size map of the downloads: the remote's own answer for the prompt (the API's bytes)."""
        candidate = _shared_choice(plan, _ambiguous(points, boxes))
        response = self._segment(model, picture, points, labels, boxes, n=candidate + 1, size=None, hq_only=hq_only)
        chosen = response.data[min(candidate, len(response.data) - 1)]
        usage = response.usage
        details = usage.input_tokens_details if usage else None
        return FullMap(
            labels=chosen.to_array(),
            objects=tuple(chosen.segments),
            cached=_cached(response),
            image_tokens=details.image_tokens if details else 0,
            point_tokens=details.point_tokens if details else 0,
        )

    @staticmethod
    def keepable(decoded: Any) -> None:
        """Nothing to keep between clicks here: the remote caches the embedding."""
        return None

    def close(self) -> None:
        self.client.close()

    # ---- the one call, and what its failures mean to a person --------------------------------------

    def _segment(
        self, model, picture, points, labels, boxes, *, n: int, size: str | None, hq_only: bool
    ) -> SegmentationResponse:
        options: dict[str, Any] = {"n": n}
        if labels is not None:
            options["point_labels"] = labels
        if size is not None:
            options["size"] = size
        if hq_only:
            options["hq_token_only"] = True
        try:
            return self.client.images.segment(
                image=_bytes(picture), segment_prompt=points, model=model, box_prompt=boxes, **options
            )
        except SegmentationAPIError as error:
            raise _page_error(error, self.url) from None
        except httpx.TimeoutException:
            raise BackendError(
                504, f"The segmentation server at {self.url} did not answer in time: try again.", "backend_timeout"
            ) from None
        except httpx.HTTPError as error:
            raise BackendError(
                502,
                f"The segmentation server at {self.url} is not reachable ({type(error).__name__}): "
                "check that it runs and that --backend names it.",
                "backend_unreachable",
            ) from None


def _page_error(error: SegmentationAPIError, url: str) -> BackendError:
    if error.status in (401, 403):
        return BackendError(
            502,
            f"The segmentation server at {url} refused this page's key ({error.status}: {error.message}). "
            "Start the page with --backend-key (or SAMHQ_BACKEND_KEY) set to a key it accepts.",
            "backend_auth",
        )
    if error.status == 429:
        return BackendError(
            429, "The segmentation server is busy right now: try again in a moment.", "rate_limit_exceeded"
        )
    if error.status == 503:
        return BackendError(503, f"The segmentation server cannot segment now: {error.message}", "backend_unavailable")
    if 400 <= error.status < 500:  # the prompt or the picture: the remote's words, as the local API says them
        return BackendError(400, error.message, error.code or "invalid_request")
    return BackendError(502, f"The segmentation server failed ({error.status}): {error.message}", "backend_error")


def _bytes(picture: Picture) -> bytes:
    return Path(picture.source).read_bytes()


def _cached(response: SegmentationResponse) -> bool:
    usage = response.usage
    return bool(usage and usage.input_tokens_details.cached_tokens)


def _ambiguous(points: list, boxes: list | None) -> list[bool]:
    """Per object: one point and no box, so it has three ranked candidates."""
    return [len(p) == 1 and (boxes is None or boxes[i] is None) for i, p in enumerate(points)]


def _shared_choice(plan: list[int], ambiguous: list[bool]) -> int:
    choices = {choice for choice, many in zip(plan, ambiguous) if many}
    return choices.pop() if len(choices) == 1 else 0


def _thumbnail(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    small = Image.fromarray(mask.astype(np.uint8)).resize(size, Image.Resampling.NEAREST)
    return np.asarray(small, dtype=np.uint8)
