"""A slim client for our API, mirroring the AI Refinery SDK's `images.segment()` call, sync and async.

    from segmentation.client import SegmentationClient

    with SegmentationClient("http://127.0.0.1:7860") as client:
        response = client.images.segment(image="photo.jpg", segment_prompt=[[[120, 80]]],
                                         model="syscv-community/sam-hq-vit-base")
    labels = response.data[0].to_array()      # H×W numpy label map

No torch: it needs httpx, pydantic, numpy and Pillow.
"""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from .schemas import SegmentationResponse

DEFAULT_TIMEOUT = 60.0
DEFAULT_MODEL = "syscv-community/sam-hq-vit-base"


class SegmentationAPIError(Exception):
    """The server answered with an error: `status`, and the `message`/`type`/`param`/`code` it sent."""

    def __init__(
        self, status: int, message: str, type: str | None = None, param: str | None = None, code: str | None = None
    ):
        super().__init__(f"{status}: {message}")
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def encode_image(image: Any) -> str:
    """Base64 of a picture given as a base64 string (kept), a path, bytes, a PIL image or a numpy array."""
    if isinstance(image, str):
        if os.path.isfile(image):
            return base64.b64encode(Path(image).read_bytes()).decode("ascii")
        return image
    if isinstance(image, Path):
        return base64.b64encode(image.read_bytes()).decode("ascii")
    if isinstance(image, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(image)).decode("ascii")
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode("ascii")
    raise TypeError(
        f"image must be base64 text, a path, bytes, a PIL image or a numpy array, not {type(image).__name__}"
    )


def _request(
    image: Any,
    segment_prompt: Any,
    model: str,
    timeout: float | None,
    default_timeout: float,
    extra_headers: dict[str, str] | None,
    extra_body: dict | None,
    kwargs: dict,
) -> dict[str, Any]:
    """The keyword arguments of the POST both clients send, with the body built the way the SDK builds it."""
    body = {
        "model": model,
        "image_prompt": encode_image(image),
        "segment_prompt": segment_prompt,
        "extra_body": extra_body,
        **kwargs,
    }
    return {
        "url": "/v1/images/segmentations",
        "json": body,
        "headers": extra_headers,
        "timeout": timeout if timeout is not None else default_timeout,
    }


_REQUEST_KEYS = {"size", "hq_token_only", "user"}


def _everything_request(
    image: Any,
    model: str,
    timeout: float | None,
    default_timeout: float,
    extra_headers: dict[str, str] | None,
    options: dict[str, Any],
) -> dict[str, Any]:
    """A "segment everything" request: the knobs go in `segment_everything`, the rest beside it."""
    knobs = {k: v for k, v in options.items() if k not in _REQUEST_KEYS}
    rest = {k: v for k, v in options.items() if k in _REQUEST_KEYS}
    rest["segment_everything"] = knobs or True
    return _request(image, [], model, timeout, default_timeout, extra_headers, None, rest)


def _parse(response: httpx.Response) -> SegmentationResponse:
    if response.status_code >= 400:
        try:
            error = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            raise SegmentationAPIError(response.status_code, response.text[:500] or response.reason_phrase) from None
        raise SegmentationAPIError(
            response.status_code, error.get("message", ""), error.get("type"), error.get("param"), error.get("code")
        )
    return SegmentationResponse.model_validate(response.json())


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class _Images:
    def __init__(self, client: SegmentationClient):
        self._client = client

    def segment(
        self,
        *,
        image: Any,
        segment_prompt: list,
        model: str = DEFAULT_MODEL,
        box_prompt: list | None = None,
        timeout: float | None = None,
        extra_headers: dict[str, str] | None = None,
        extra_body: dict | None = None,
        **kwargs: Any,
    ) -> SegmentationResponse:
        """Segment `image` from point and box prompts. `box_prompt`: one `[x0, y0, x1, y1]` or None per
        object of `segment_prompt` (a box-only object has an empty point list). kwargs: point_labels,
        n, size, hq_token_only, user."""
        if box_prompt is not None:
            kwargs["box_prompt"] = box_prompt
        request = _request(
            image, segment_prompt, model, timeout, self._client.timeout, extra_headers, extra_body, kwargs
        )
        return _parse(self._client._http.post(**request))

    def segment_everything(
        self,
        *,
        image: Any,
        model: str = DEFAULT_MODEL,
        timeout: float | None = None,
        extra_headers: dict[str, str] | None = None,
        **options: Any,
    ) -> SegmentationResponse:
        """Every object of `image` (official SAM-HQ's automatic mask generator): one label map, one segment per
        object. options: points_per_side, points_per_batch, pred_iou_thresh, stability_score_thresh,
        stability_score_offset, box_nms_thresh, min_mask_region_area (official's names and defaults; e.g.
        min_mask_region_area=100 fills holes and removes islands under 100 pixels), and size, hq_token_only, user."""
        request = _everything_request(image, model, timeout, self._client.timeout, extra_headers, options)
        return _parse(self._client._http.post(**request))


class SegmentationClient:
    """Synchronous client. `api_key` defaults to $SAMHQ_API_KEY. `event_hooks`: httpx's, e.g. a response hook
    that bounds what a server may send (the page's remote backend does)."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:7860",
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        event_hooks: dict[str, list] | None = None,
    ):
        self.timeout = timeout
        api_key = api_key if api_key is not None else os.environ.get("SAMHQ_API_KEY")
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"), headers=_headers(api_key), timeout=timeout, event_hooks=event_hooks
        )
        self.images = _Images(self)

    def models(self) -> list[str]:
        response = self._http.get("/v1/models")
        if response.status_code >= 400:
            _parse(response)
        return [card["id"] for card in response.json()["data"]]

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SegmentationClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _AsyncImages:
    def __init__(self, client: AsyncSegmentationClient):
        self._client = client

    async def segment(
        self,
        *,
        image: Any,
        segment_prompt: list,
        model: str = DEFAULT_MODEL,
        box_prompt: list | None = None,
        timeout: float | None = None,
        extra_headers: dict[str, str] | None = None,
        extra_body: dict | None = None,
        **kwargs: Any,
    ) -> SegmentationResponse:
        """Segment `image` from point and box prompts. `box_prompt`: one `[x0, y0, x1, y1]` or None per
        object of `segment_prompt` (a box-only object has an empty point list). kwargs: point_labels,
        n, size, hq_token_only, user."""
        if box_prompt is not None:
            kwargs["box_prompt"] = box_prompt
        request = _request(
            image, segment_prompt, model, timeout, self._client.timeout, extra_headers, extra_body, kwargs
        )
        return _parse(await self._client._http.post(**request))

    async def segment_everything(
        self,
        *,
        image: Any,
        model: str = DEFAULT_MODEL,
        timeout: float | None = None,
        extra_headers: dict[str, str] | None = None,
        **options: Any,
    ) -> SegmentationResponse:
        """Every object of `image` (official SAM-HQ's automatic mask generator): one label map, one segment per
        object. options: points_per_side, points_per_batch, pred_iou_thresh, stability_score_thresh,
        stability_score_offset, box_nms_thresh, min_mask_region_area (official's names and defaults; e.g.
        min_mask_region_area=100 fills holes and removes islands under 100 pixels), and size, hq_token_only, user."""
        request = _everything_request(image, model, timeout, self._client.timeout, extra_headers, options)
        return _parse(await self._client._http.post(**request))


class AsyncSegmentationClient:
    """Asynchronous client (httpx.AsyncClient). `api_key` defaults to $SAMHQ_API_KEY."""

    def __init__(
        self, base_url: str = "http://127.0.0.1:7860", api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT
    ):
        self.timeout = timeout
        api_key = api_key if api_key is not None else os.environ.get("SAMHQ_API_KEY")
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=_headers(api_key), timeout=timeout)
        self.images = _AsyncImages(self)

    async def models(self) -> list[str]:
        response = await self._http.get("/v1/models")
        if response.status_code >= 400:
            _parse(response)
        return [card["id"] for card in response.json()["data"]]

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncSegmentationClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
