"""`RemoteBackend`: the page's seam to the engine when the segmentation runs elsewhere (`app.py --backend URL`).

The same calls as `LocalBackend`, answered by a remote API (ours, or the Ray Serve application) through
our client (`segmentation.client`: httpx, no torch), so a page process holds no model. Each click sends the
picture's bytes: the remote server finds its embedding by their digest, so only the first click pays for
the encoder. The per-click map comes back at PREVIEW size (`size=`), the downloads' map at full size;
a one-point object's three candidates come from `n=3`. The remote's refusals become page messages.

The remote is untrusted input: the model ids it lists must look like model ids (and are only ever written
into a snippet quoted), and every answer is checked before it is used — as many maps as asked, each a
grayscale label-map PNG whose size, read from its header BEFORE it is decoded, is the size asked for,
values within the prompt's objects, one finite score per object. Anything else is a 502 with words a
person understands (`BackendError`), never an exception out of the page.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import logging
import math
import re
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from segmentation.client import SegmentationAPIError, SegmentationClient
from segmentation.images import load_image
from segmentation.limits import Limits
from segmentation.schemas import Mask, Segment, SegmentationResponse
from segmentation.settings import Settings

from .state import Picture
from .types import THUMBNAIL_SIDE, FullMap, Preview, PreviewObject

log = logging.getLogger("ui.remote")

# What a model id may look like: a hub id (owner/name) or a folder path; nothing that could close a quote
MODEL_ID = re.compile(r"[A-Za-z0-9_./-]{1,200}", re.ASCII)
MAX_MODELS = 64
# Segment everything is one request that lasts the whole run (a 32x32 grid takes minutes on a CPU).
EVERYTHING_TIMEOUT = 900.0
MiB = 1024 * 1024
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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
        self._limit = threading.local()  # the most bytes the answer to this thread's call may have
        self.client = SegmentationClient(
            self.url, api_key=api_key or "", timeout=timeout, event_hooks={"response": [self._bound_answer]}
        )
        self.limits = Limits.from_settings(settings)
        try:
            listed = self.client.models()
        except (SegmentationAPIError, httpx.HTTPError, ValueError, KeyError, TypeError) as error:
            log.warning("could not list the models of %s (%s): offering %s", self.url, error, settings.model)
            listed = []
        served = plausible_models(listed if isinstance(listed, list) else [], self.url)
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
        self._answer(response, 1, "1x1")
        return hashlib.sha256(_bytes(picture)).hexdigest(), _cached(response)

    def check(self, model: str, picture: Picture, points: list, labels: list, boxes: list | None) -> None:
        """Would the page accept this prompt? The same limits as this process's API (the remote applies its
        own too): objects, points, coordinates, and the work of the remote's maps (at the picture's size)."""
        n = 3 if any(_ambiguous(points, boxes)) else 1
        self.limits.check_prompt(points, labels, boxes, picture.width, picture.height, candidates=n)

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
        """One label map at preview size. The API's i-th map gives every object its i-th candidate, so the
        map shown uses the one-point objects' shared choice (their first candidate when they differ)."""
        start = time.perf_counter()
        ambiguous = _ambiguous(points, boxes)
        width, height = picture.preview
        n = 3 if any(ambiguous) else 1
        response = self._segment(model, picture, points, labels, boxes, n=n, size=f"{width}x{height}", hq_only=hq_only)
        maps = self._answer(response, n, f"{width}x{height}", objects=len(points))
        shared = min(_shared_choice(plan, ambiguous), len(maps) - 1)
        label_map, chosen = maps[shared]
        total = float(label_map.size)
        objects = tuple(
            PreviewObject(
                value=s.value,
                score=s.score,
                percent=100.0 * s.area / total,
                candidate=shared if ambiguous[s.value - 1] else 0,
                candidates=len(maps) if ambiguous[s.value - 1] else 1,
            )
            for s in chosen
        )
        thumbnails: tuple[tuple[np.ndarray, float], ...] = ()
        if active is not None and ambiguous[active] and len(maps) > 1:
            scale = min(1.0, THUMBNAIL_SIDE / max(width, height))
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            thumbnails = tuple(
                (_thumbnail(labels == active + 1, size), float(segments[active].score)) for labels, segments in maps
            )
        timings = {"page": time.perf_counter() - start}
        return Preview(label_map, objects, thumbnails, False, timings)

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
        """The full-size map of the downloads: the remote's own answer for the prompt (the API's bytes)."""
        candidate = _shared_choice(plan, _ambiguous(points, boxes))
        response = self._segment(model, picture, points, labels, boxes, n=candidate + 1, size=None, hq_only=hq_only)
        maps = self._answer(response, candidate + 1, f"{picture.width}x{picture.height}", objects=len(points))
        label_map, segments = maps[min(candidate, len(maps) - 1)]
        usage = response.usage
        details = usage.input_tokens_details if usage else None
        return FullMap(
            labels=label_map,
            objects=tuple(segments),
            cached=_cached(response),
            image_tokens=details.image_tokens if details else 0,
            point_tokens=details.point_tokens if details else 0,
        )

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
        width, height = (int(v) for v in size.split("x")) if size else (picture.width, picture.height)
        self._limit.bytes = n * _png_bound(width, height, len(points)) * 4 // 3 + MiB  # base64, JSON around it
        return self._call(
            lambda: self.client.images.segment(
                image=_bytes(picture), segment_prompt=points, model=model, box_prompt=boxes, **options
            )
        )

    def everything(
        self, model: str, picture: Picture, options: dict[str, Any], *, hq_only: bool, grid_points: int
    ) -> list[list[float]]:
        """Segment everything on the remote, in one request: the grid points of the masks it kept, best first
        (each becomes a one-point object, as when the model is in this process). Only the segments are used:
        the page decodes each object itself, so the map is asked for at 1x1. Its `point`s must be there (a
        server of this project's API gives them), one per object, inside the picture, at most one per grid point."""
        knobs = dict(options)
        if hq_only:
            knobs["hq_token_only"] = True
        self._limit.bytes = MiB + 512 * grid_points  # a 1x1 map and a few numbers per object
        response = self._call(
            lambda: self.client.images.segment_everything(
                image=_bytes(picture), model=model, size="1x1", timeout=EVERYTHING_TIMEOUT, **knobs
            )
        )
        self._answer(response, 1, "1x1")
        segments = sorted(response.data[0].segments, key=lambda s: s.value)
        if len(segments) > grid_points or [s.value for s in segments] != list(range(1, len(segments) + 1)):
            raise self._bad_answer(
                f"{len(segments)} objects numbered otherwise than 1..n from a {grid_points}-point grid"
            )
        points = []
        for segment in segments:
            point = segment.point
            if point is None:
                raise self._bad_answer("objects without the grid point that found them (an older version of the API?)")
            if not (
                len(point) == 2
                and all(math.isfinite(v) for v in point)
                and 0 <= point[0] <= picture.width
                and 0 <= point[1] <= picture.height
            ):
                raise self._bad_answer("a grid point outside the picture")
            points.append([float(point[0]), float(point[1])])
        return points

    def _call(self, send: Callable[[], SegmentationResponse]) -> SegmentationResponse:
        """One request to the remote; its failures as BackendErrors with words for people."""
        try:
            return send()
        except AnswerTooLarge as error:
            raise self._bad_answer(f"more than {error.limit / MiB:.1f} MB where its maps need less") from None
        except SegmentationAPIError as error:
            raise _page_error(error, self.url) from None
        except (ValueError, TypeError):  # not JSON, or JSON that is not a segmentation answer (pydantic's)
            raise self._bad_answer("something that is not a segmentation answer") from None
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

    def _bound_answer(self, response: httpx.Response) -> None:
        """httpx's response hook, run before the body is read: a body longer than this call's bound (1 MiB
        for anything but a segmentation) is refused by its Content-Length, or cut off once that many bytes came."""
        limit = getattr(self._limit, "bytes", MiB)
        self._limit.bytes = MiB
        announced = response.headers.get("content-length", "")
        if announced.isdigit() and int(announced) > limit:
            response.close()
            raise AnswerTooLarge(limit)
        response.stream = _BoundedStream(response.stream, limit)

    def _bad_answer(self, what: str) -> BackendError:
        log.warning("the segmentation server at %s answered %s", self.url, what)
        return BackendError(
            502,
            f"The segmentation server at {self.url} answered {what}: this page cannot use it. Check that --backend "
            "names this project's segmentation API (or its Ray Serve application).",
            "backend_bad_answer",
        )

    def _answer(
        self, response: SegmentationResponse, asked: int, size: str, objects: int | None = None
    ) -> list[tuple[np.ndarray, list[Segment]]]:
        """The answer's label maps, each checked before use: 1..`asked` maps, each a grayscale PNG of exactly
        `size` (read from its header before any pixel is decoded), values 0..objects, and one finite score per
        object. `objects` None: only the count of maps is checked (the 1×1 answer of an embed)."""
        data = response.data
        if not 1 <= len(data) <= asked:
            raise self._bad_answer(f"{len(data)} label maps where 1 to {asked} were asked for")
        if objects is None:
            return []
        width, height = (int(v) for v in size.split("x"))
        return [(self._label_map(mask, width, height, objects), self._segments(mask, objects)) for mask in data]

    def _label_map(self, mask: Mask, width: int, height: int, objects: int) -> np.ndarray:
        encoded = mask.b64_json or ""
        # a label-map PNG is never much larger than its raw pixels: refuse a larger one before decoding base64
        if len(encoded) > 4 * (_png_bound(width, height, objects) // 3 + 1):
            raise self._bad_answer(f"a label map far larger than a {width}x{height} one")
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise self._bad_answer("a label map that is not base64") from None
        header = _png_header(data)
        if header is None:
            raise self._bad_answer("a label map that is not a PNG")
        got_width, got_height, bit_depth, colour = header
        if (got_width, got_height) != (width, height):
            raise self._bad_answer(f"a {got_width}x{got_height} label map where {width}x{height} was asked for")
        if colour != 0 or bit_depth not in (8, 16):
            raise self._bad_answer("a label map that is not a grayscale 8- or 16-bit PNG")
        try:
            with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
                image.load()
                labels = np.asarray(image).astype(np.uint16 if bit_depth == 16 else np.uint8, copy=False)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            raise self._bad_answer("a label map PNG that cannot be decoded") from None
        if labels.shape != (height, width):
            raise self._bad_answer("a label map of another size than its header says")
        if labels.size and int(labels.max()) > objects:
            raise self._bad_answer(f"a label map with values beyond its {objects} object(s)")
        return labels

    def _segments(self, mask: Mask, objects: int) -> list[Segment]:
        segments = sorted(mask.segments, key=lambda s: s.value)
        if [s.value for s in segments] != list(range(1, objects + 1)):
            raise self._bad_answer(f"a label map without one segment per object ({objects})")
        if not all(math.isfinite(s.score) and s.area >= 0 for s in segments):
            raise self._bad_answer("segments with scores that are not numbers")
        return segments


class AnswerTooLarge(Exception):
    """The remote's answer is longer than the maps asked for can be."""

    def __init__(self, limit: int):
        super().__init__(limit)
        self.limit = limit


class _BoundedStream(httpx.SyncByteStream):
    """A response body that raises AnswerTooLarge once more than `limit` bytes have come, instead of
    reading (and holding) whatever the server sends."""

    def __init__(self, inner: Any, limit: int):
        self.inner, self.limit = inner, limit

    def __iter__(self):
        seen = 0
        for chunk in self.inner:
            seen += len(chunk)
            if seen > self.limit:
                raise AnswerTooLarge(self.limit)
            yield chunk

    def close(self) -> None:
        self.inner.close()


def _png_bound(width: int, height: int, objects: int) -> int:
    """The most bytes a label-map PNG of width × height needs: its raw rows (8-bit, 16-bit beyond 255
    objects, a filter byte a row) and a MiB for zlib and chunks."""
    return width * height * (1 if objects <= 255 else 2) + height + MiB


def plausible_models(listed: list, url: str) -> tuple[str, ...]:
    """The model ids a remote lists that look like model ids (a hub id or a folder path), at most
    MAX_MODELS; anything else is dropped with a warning (shortened and escaped), never offered or written."""
    ids = [card for card in listed if isinstance(card, str) and MODEL_ID.fullmatch(card) and ".." not in card]
    dropped = [card for card in listed if card not in ids]
    if dropped:
        log.warning("%s lists %d model id(s) that do not look like one, ignored: %.200r", url, len(dropped), dropped)
    return tuple(dict.fromkeys(ids))[:MAX_MODELS]


def _png_header(data: bytes) -> tuple[int, int, int, int] | None:
    """(width, height, bit depth, colour type) from a PNG's IHDR chunk, without decoding anything."""
    if len(data) < 33 or not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height, bit_depth, colour = struct.unpack(">IIBB", data[16:26])
    return width, height, bit_depth, colour


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
