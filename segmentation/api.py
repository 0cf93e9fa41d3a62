"""The HTTP API: `POST /v1/images/segmentations` (AI Refinery SDK compatible), `GET /v1/models`,
`POST /authentication/validate`. Thin: parsing and errors here, the work in `service`.

`install_api(app, registry, settings)` adds the routes, the request-body limit and the error
handlers to an existing FastAPI app (the one the Gradio UI is mounted on). The handlers only
reformat responses under the API's own paths and leave Gradio's alone.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import re
import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import service
from .errors import (
    ImageTooLargeError,
    ModelUnavailableError,
    ResourceExhaustedError,
    SegmentationError,
    UnknownModelError,
)
from .masks import parse_size
from .models import CATALOG
from .schemas import (
    ErrorResponse,
    ModelCard,
    ModelList,
    SegmentationRequest,
    SegmentationResponse,
    ValidateResponse,
    build_response,
)
from .settings import Settings

log = logging.getLogger(__name__)

API_PREFIXES = ("/v1/", "/authentication/")
ORGANIZATION_ID = "local"
_DATA_URL = re.compile(r"^data:[\w/+.-]*(;[\w=.-]+)*;base64,", re.IGNORECASE)
_STARTED = int(time.time())


class APIError(Exception):
    """An error answered as `{"error": {...}}` with its HTTP status."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_response(
    status: int, message: str, type_: str, param: str | None = None, code: str | None = None, headers=None
):
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(status_code=status, content=body, headers=headers)


def _engine_error(error: SegmentationError) -> APIError:
    """Map engine errors to statuses: the caller's fault is a 4xx, capacity and availability a 503/429."""
    if isinstance(error, ImageTooLargeError):
        return APIError(413, error.message, "invalid_request_error", "image_prompt", error.code)
    if isinstance(error, UnknownModelError):
        return APIError(404, error.message, "invalid_request_error", "model", error.code)
    if isinstance(error, (ModelUnavailableError, ResourceExhaustedError)):
        return APIError(503, error.message, "server_error", error.param, error.code)
    if isinstance(error, service.OverloadedError):
        return APIError(429, error.message, "rate_limit_error", None, error.code)
    param = {"image": "image_prompt"}.get(error.param or "", error.param)
    return APIError(400, error.message, "invalid_request_error", param, error.code)


def decode_base64_image(value: str) -> bytes:
    """The picture bytes of `image_prompt` (a `data:` URL prefix is allowed)."""
    payload = _DATA_URL.sub("", value.strip(), count=1)
    payload = re.sub(r"\s+", "", payload)
    if not payload:
        raise APIError(
            400,
            "image_prompt is empty: send the picture base64-encoded.",
            "invalid_request_error",
            "image_prompt",
            "invalid_image",
        )
    try:
        return base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError) as error:
        raise APIError(
            400, "image_prompt is not valid base64.", "invalid_request_error", "image_prompt", "invalid_base64"
        ) from error


class BodySizeLimit:
    """Answers 413 for API requests whose body exceeds the limit, without reading the rest of it."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(API_PREFIXES):
            await self.app(scope, receive, send)
            return
        too_large = error_response(
            413,
            f"The request body is larger than the {self.max_bytes // 2**20} MiB limit.",
            "invalid_request_error",
            None,
            "request_too_large",
        )
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await too_large(scope, receive, send)
            return
        received = 0
        started = refused = False

        async def nothing_more() -> Message:
            return {"type": "http.disconnect"}

        async def counting_receive() -> Message:
            # Past the limit: answer 413 now and tell the app the client left, so it stops reading.
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = True
                    if not started:
                        await too_large(scope, nothing_more, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # our 413 is the answer; drop what the app says after the disconnect
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counting_receive, guarded_send)


def _auth_dependency(settings: Settings):
    keys = [key.encode() for key in settings.api_keys]

    async def require_key(request: Request) -> None:
        if not keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        supplied = token.strip().encode() if scheme.lower() == "bearer" else b""
        # compare against every key, always, so timing says nothing about which matched
        matched = False
        for key in keys:
            matched |= hmac.compare_digest(supplied, key)
        if not matched:
            raise APIError(
                401,
                "Missing or invalid API key: send 'Authorization: Bearer <key>'.",
                "authentication_error",
                None,
                "invalid_api_key",
            )

    return require_key


_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 422, 429, 503)}


SegmentFn = Callable[..., service.SegmentResult]


def create_router(
    registry: service.ModelRegistry, settings: Settings, segment: SegmentFn = service.segment
) -> APIRouter:
    """The API's routes. `segment` does the work (`service.segment`'s signature); another
    deployment (e.g. the Ray Serve ingress) passes its own to reuse this contract unchanged."""
    router = APIRouter(dependencies=[Depends(_auth_dependency(settings))], responses=_ERRORS)
    gate = service.AdmissionGate(max_concurrent=4, max_waiting=settings.max_queue)

    @router.post("/v1/images/segmentations", response_model=SegmentationResponse, tags=["images"])
    async def create_segmentation(body: SegmentationRequest) -> SegmentationResponse:
        """Segment a picture from point prompts: one categorical label map per candidate (n), best first."""
        if not 1 <= body.n <= 3:
            raise APIError(400, f"n must be from 1 to 3, got {body.n}.", "invalid_request_error", "n", "invalid_n")
        try:
            size = parse_size(body.size) if body.size is not None else None
        except ValueError as error:
            raise APIError(400, str(error), "invalid_request_error", "size", "invalid_size") from error
        registry.check_served(body.model)
        picture = decode_base64_image(body.image_prompt)
        if body.user:
            log.info("segmentation request from user %r for %s", body.user, body.model)

        def work() -> SegmentationResponse:  # in a worker thread, PNG encoding included: the event loop stays free
            with gate:
                result = segment(
                    registry,
                    image=picture,
                    points=body.segment_prompt,
                    labels=body.point_labels,
                    boxes=body.box_prompt,
                    model=body.model,
                    candidates=body.n,
                    hq_token_only=body.hq_token_only,
                    size=size,
                )
            return build_response(result)

        return await run_in_threadpool(work)

    @router.get("/v1/models", response_model=ModelList, tags=["models"])
    async def list_models() -> ModelList:
        """The models this server serves (each loaded on first use)."""
        cards = []
        for name in registry.served:
            spec = CATALOG.get(name)
            owner = name.split("/")[0] if "/" in name else "local"
            cards.append(
                ModelCard(
                    id=name,
                    created=_STARTED,
                    owned_by=owner,
                    family=spec.family if spec else None,
                    status=registry.status(name),
                )
            )
        return ModelList(data=cards)

    @router.post("/authentication/validate", response_model=ValidateResponse, tags=["authentication"])
    async def validate_key() -> ValidateResponse:
        """What the AI Refinery SDK calls to check a key."""
        return ValidateResponse(
            message="API key is valid." if settings.api_keys else "This server is open: no key is required.",
            organization_id=ORGANIZATION_ID,
        )

    return router


def _is_api(request: Request) -> bool:
    return request.url.path.startswith(API_PREFIXES)


def _describe_validation(errors: list[dict[str, Any]]) -> tuple[str, str | None, int, str]:
    """(message, param, status, code) for pydantic/JSON errors, naming the field and the position in it."""
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return "The request body is not valid JSON.", None, 400, "invalid_json"
    if not loc:
        return "The request body must be a JSON object.", None, 400, "invalid_body"
    field = loc[0]
    where = "".join(f"[{part}]" for part in loc[1:])
    if first.get("type") == "missing":
        return f"Missing required field '{field}'.", field, 422, "missing_field"
    message = f"{field}{where}: {first.get('msg', 'invalid value')}"
    if field == "segment_prompt":
        message += " (segment_prompt nests objects → points → [x, y], e.g. [[[120, 80]]])"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return message + more, field, 422, "invalid_value"


def install_api(
    app: FastAPI, registry: service.ModelRegistry, settings: Settings, segment: SegmentFn = service.segment
) -> None:
    """Add the API routes, its body limit and its error format to `app`."""
    app.include_router(create_router(registry, settings, segment))
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_mb * 2**20)
    if settings.api_keys:
        log.info("API keys configured: /v1/* and /authentication/validate require a bearer key")
    else:
        log.warning("No API keys configured (SAMHQ_API_KEYS): the HTTP API is open to anyone who can reach it")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError):
        return error_response(error.status, error.message, error.type, error.param, error.code)

    @app.exception_handler(SegmentationError)
    async def _segmentation_error(request: Request, error: SegmentationError):
        mapped = _engine_error(error)
        headers = {"Retry-After": "5"} if mapped.status in (429, 503) else None
        return error_response(mapped.status, mapped.message, mapped.type, mapped.param, mapped.code, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError):
        if not _is_api(request):
            return await request_validation_exception_handler(request, error)
        message, param, status, code = _describe_validation(jsonable_encoder(error.errors()))
        return error_response(status, message, "invalid_request_error", param, code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException):
        if not _is_api(request):
            return await http_exception_handler(request, error)
        kind = "authentication_error" if error.status_code == 401 else "invalid_request_error"
        return error_response(error.status_code, str(error.detail), kind, None, None, getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return error_response(500, "Internal server error; the request was not processed.", "server_error")
