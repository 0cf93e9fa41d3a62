"""The HTTP API: `POST /v1/images/segmentations` (AI Refinery SDK compatible), `GET /v1/models`,
`POST /authentication/validate`. Thin: parsing and errors here, the work in `service`.

`install_api(app, registry, settings)` adds the routes, the request guard (API keys and body caps
on every route, Gradio's too: `segmentation.guard`) and the error handlers to an existing FastAPI
app (the one the Gradio UI is mounted on). The handlers only reformat responses under the API's
own paths and leave Gradio's alone.

The segmentation route reads its body itself and parses and validates it in a worker thread,
failing on the first bad element of the prompt: a large or malformed body never blocks the event
loop, and never makes pydantic build millions of errors. The limits of `segmentation.limits` run
here, before the `segment` function (so a deployment that brings its own gets them too), and
again in `service.segment`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from . import service
from .errors import (
    ImageTooLargeError,
    InvalidPromptError,
    ModelUnavailableError,
    RequestLimitError,
    ResourceExhaustedError,
    SegmentationError,
    UnknownModelError,
)
from .everything import Cancelled
from .everything_options import EverythingOptions, parse_everything
from .guard import RequestGuard, key_is_valid
from .images import upright_size
from .limits import MAX_COORDINATE, Limits, loggable_user
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
    merge_extra_body,
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


def _strict_base64(payload: str) -> bytes:
    return base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)


def decode_base64_image(value: str) -> bytes:
    """The picture bytes of `image_prompt` (a `data:` URL prefix is allowed)."""
    payload = _DATA_URL.sub("", value.strip(), count=1)
    if not payload:
        raise APIError(
            400,
            "image_prompt is empty: send the picture base64-encoded.",
            "invalid_request_error",
            "image_prompt",
            "invalid_image",
        )
    try:
        return _strict_base64(payload)
    except (binascii.Error, ValueError):
        pass  # line breaks or spaces inside: strip them (a regex pass over the whole text, ~4 ms per 300 kB) and retry
    try:
        return _strict_base64(re.sub(r"\s+", "", payload))
    except (binascii.Error, ValueError) as error:
        raise APIError(
            400, "image_prompt is not valid base64.", "invalid_request_error", "image_prompt", "invalid_base64"
        ) from error


def _auth_dependency(settings: Settings):
    """The key check again inside the router, for a deployment that reuses it without the guard."""
    keys = [key.encode() for key in settings.api_keys]

    async def require_key(request: Request) -> None:
        if keys and not key_is_valid(request.headers.get("authorization", "").encode(), keys):
            raise APIError(
                401,
                "Missing or invalid API key: send 'Authorization: Bearer <key>'.",
                "authentication_error",
                None,
                "invalid_api_key",
            )

    return require_key


# ---- the request body, parsed off the event loop ------------------------------------------------


class _BadValue(Exception):
    """The first element of the prompt that the schema refuses (a 422 naming its position)."""

    def __init__(self, loc: list[Any], message: str):
        super().__init__(message)
        self.loc, self.message = loc, message


def _check_number(value: Any, loc: list[Any]) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _BadValue(loc, "Input should be a valid number")
    if isinstance(value, float) and not math.isfinite(value):
        raise _BadValue(loc, "Input should be a finite number")
    if not -MAX_COORDINATE <= value <= MAX_COORDINATE:
        raise _BadValue(loc, f"Input should be between -{MAX_COORDINATE} and {MAX_COORDINATE}")


def _check_boxes(boxes: Any, limits: Limits) -> None:
    """`box_prompt`: None, or at most one box (or null) per object; each box's first values must be numbers."""
    if boxes is None:
        return
    if not isinstance(boxes, list):
        raise _BadValue(["box_prompt"], "Input should be a valid list")
    if len(boxes) > limits.max_objects:
        raise InvalidPromptError(
            f"box_prompt has {len(boxes)} boxes; the limit is {limits.max_objects}.", param="box_prompt"
        )
    for i, box in enumerate(boxes):
        if box is None:
            continue
        if not isinstance(box, list):
            raise _BadValue(["box_prompt", i], "Input should be a valid list")
        for k, value in enumerate(box[:4]):
            _check_number(value, ["box_prompt", i, k])
        if len(box) != 4:
            raise InvalidPromptError(
                f"object {i + 1}: the box must be [x0, y0, x1, y1] or null, got {len(box)} values.", param="box_prompt"
            )


def _check_prompt(points: Any, labels: Any, limits: Limits, boxes: Any = None) -> None:
    """Walk `segment_prompt` and `point_labels` once, stopping at the first problem: the counts of
    `limits` (400, as prompt validation words them) and the schema's types (422). What reaches
    pydantic afterwards is small and well-formed, so it never builds more than a few errors."""
    if not isinstance(points, list):
        raise _BadValue(["segment_prompt"], "Input should be a valid list")
    limits.check_object_count(len(points))
    for i, obj in enumerate(points):
        if not isinstance(obj, list):
            raise _BadValue(["segment_prompt", i], "Input should be a valid list")
        limits.check_point_count(i, len(obj))
        for j, point in enumerate(obj):
            if not isinstance(point, list):
                raise _BadValue(["segment_prompt", i, j], "Input should be a valid list")
            for k, value in enumerate(point[:2]):  # the types first, as the schema would, and only the first two
                _check_number(value, ["segment_prompt", i, j, k])
            if len(point) != 2:
                raise InvalidPromptError(
                    f"object {i + 1}, point {j + 1} must be [x, y], got {len(point)} values.", param="segment_prompt"
                )
    _check_boxes(boxes, limits)
    if labels is None:
        return
    if not isinstance(labels, list):
        raise _BadValue(["point_labels"], "Input should be a valid list")
    if len(labels) != len(points):
        raise InvalidPromptError(
            f"point_labels must have one list per object ({len(points)} objects), got {len(labels)}.",
            param="point_labels",
        )
    for i, (obj_labels, obj) in enumerate(zip(labels, points)):
        if not isinstance(obj_labels, list):
            raise _BadValue(["point_labels", i], "Input should be a valid list")
        if len(obj_labels) != len(obj):
            raise InvalidPromptError(
                f"object {i + 1} has {len(obj)} points but point_labels gives {len(obj_labels)} for it.",
                param="point_labels",
            )
        for j, label in enumerate(obj_labels):
            if isinstance(label, bool) or not isinstance(label, int):
                raise _BadValue(["point_labels", i, j], "Input should be a valid integer")


def parse_segmentation_request(raw: bytes, limits: Limits) -> SegmentationRequest:
    """The request body → SegmentationRequest, or APIError / InvalidPromptError. Run it off the event loop."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as error:  # not JSON, not UTF-8, nested too deep, an integer too long
        raise APIError(
            400, "The request body is not valid JSON.", "invalid_request_error", None, "invalid_json"
        ) from error
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.", "invalid_request_error", None, "invalid_body")
    data = merge_extra_body(data)
    try:
        if "segment_prompt" in data:
            _check_prompt(data["segment_prompt"], data.get("point_labels"), limits, data.get("box_prompt"))
        return SegmentationRequest.model_validate(data)
    except _BadValue as bad:
        message, param, status, code = _describe_validation([{"loc": bad.loc, "msg": bad.message, "type": "value"}])
    except ValidationError as error:
        message, param, status, code = _describe_validation(error.errors(include_url=False, include_input=False))
    raise APIError(status, message, "invalid_request_error", param, code)


def _request_body_schema() -> dict[str, Any]:
    """/openapi.json documents the body the route parses itself: the same pydantic model."""
    schema = SegmentationRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


async def _watch_disconnect(request: Request, gone: threading.Event, gate: service.AdmissionGate) -> None:
    """Once the body is read, the next message is the client leaving: mark the request abandoned."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            gone.set()
            gate.wake()
            return


_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 422, 429, 503)}


SegmentFn = Callable[..., service.SegmentResult]


def everything_options(body: SegmentationRequest) -> EverythingOptions | None:
    """The request's "segment everything" options (None for a prompt request); a 400 naming the knob when one
    is wrong, or when a prompt is sent with it (one or the other)."""
    if body.segment_everything in (None, False):
        return None
    options = parse_everything(body.segment_everything)
    if body.segment_prompt or body.box_prompt or body.point_labels:
        raise InvalidPromptError(
            "segment_everything finds every object by itself: send an empty segment_prompt (or none), "
            "and no point_labels or box_prompt.",
            param="segment_prompt",
        )
    if body.n != 1:
        raise RequestLimitError("segment_everything answers one label map: n must be 1.", param="n", code="invalid_n")
    return options


_EVERYTHING_BUSY = "The server is busy segmenting everything for others. Retry in a minute."


def create_router(
    registry: service.ModelRegistry,
    settings: Settings,
    segment: SegmentFn = service.segment,
    everything: SegmentFn | None = None,
) -> APIRouter:
    """The API's routes. `segment` does the work (`service.segment`'s signature); another
    deployment (e.g. the Ray Serve ingress) passes its own to reuse this contract unchanged.
    `everything` (`service.segment_everything`'s signature) serves `segment_everything`; by default it is
    offered where the models run in this process (`segment` is `service.segment`), refused elsewhere."""
    router = APIRouter(dependencies=[Depends(_auth_dependency(settings))], responses=_ERRORS)
    gate = service.AdmissionGate(max_concurrent=4, max_waiting=settings.max_queue)
    everything_runs = service.JobSlots(settings.everything_runs)
    if everything is None and segment is service.segment:
        everything = service.segment_everything

    limits = registry.limits

    @router.post(
        "/v1/images/segmentations",
        response_model=SegmentationResponse,
        tags=["images"],
        openapi_extra=_request_body_schema(),
    )
    async def create_segmentation(request: Request) -> Response:
        """Segment a picture from point prompts: one categorical label map per candidate (n), best first."""
        raw = await request.body()  # bounded by the guard's cap
        body = await run_in_threadpool(parse_segmentation_request, raw, limits)
        try:
            size = parse_size(body.size) if body.size is not None else None
        except ValueError as error:
            raise APIError(400, str(error), "invalid_request_error", "size", "invalid_size") from error
        options = everything_options(body)
        if options is not None and everything is None:
            raise APIError(
                400,
                "segment_everything is not offered by this deployment.",
                "invalid_request_error",
                "segment_everything",
                "not_supported",
            )
        if options is None:
            limits.check(points=body.segment_prompt, candidates=body.n, size=size)
        else:
            limits.check_size(size)
        registry.check_served(body.model)
        gone = threading.Event()
        watcher = asyncio.create_task(_watch_disconnect(request, gone, gate))

        def work_everything() -> Response:
            """Each batch takes a gate slot of its own: queued clicks get their turn between batches; a client
            that left stops the run at the next batch."""
            picture = decode_base64_image(body.image_prompt)
            width, height = upright_size(picture, limits.max_pixels)
            limits.check_everything_work(options.grid_points, width, height)
            result = everything(
                registry,
                image=picture,
                options=options,
                model=body.model,
                hq_token_only=body.hq_token_only,
                size=size,
                batch_context=lambda: gate.admit_after_others(gone),
                cancelled=gone.is_set,
            )
            if body.user:
                log.info("segment everything for user %s with %s", loggable_user(body.user), body.model)
            return Response(build_response(result).model_dump_json(), media_type="application/json")

        def work() -> Response:  # in a worker thread, PNG encoding included: the event loop stays free
            picture = decode_base64_image(body.image_prompt)
            limits.check_picture_bytes(len(picture))  # the page's upload rule, the same number
            width, height = upright_size(picture, limits.max_pixels)  # the header only
            limits.check_work(len(body.segment_prompt), body.n, width, height)
            with gate.admit(gone):
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
            if body.user:  # only a request that passed every check: shortened and escaped
                log.info("segmentation for user %s with %s", loggable_user(body.user), body.model)
            return Response(build_response(result).model_dump_json(), media_type="application/json")

        # an everything run holds a worker thread for its whole length: at most settings.everything_runs at once
        slot = contextlib.nullcontext() if options is None else everything_runs.take(_EVERYTHING_BUSY)
        try:
            with slot:
                return await run_in_threadpool(work if options is None else work_everything)
        except (service.ClientGone, Cancelled):
            log.info("dropped a request whose client left before it ran")
            return Response(status_code=499)  # nobody reads it
        except asyncio.CancelledError:  # the server cancelled the handler (Ray Serve does when the client leaves)
            gone.set()  # what still runs for it in the worker thread stops as if the client's disconnect came
            gate.wake()
            raise
        finally:
            watcher.cancel()

    @router.get("/v1/models", response_model=ModelList, tags=["models"])
    async def list_models() -> ModelList:
        """The models this server serves (each loaded on first use)."""
        cards = []
        # in a worker thread: a registry whose models live elsewhere (the Ray ingress) asks for their status
        statuses = await run_in_threadpool(lambda: {name: registry.status(name) for name in registry.served})
        for name in registry.served:
            spec = CATALOG.get(name)
            owner = name.split("/")[0] if "/" in name else "local"
            cards.append(
                ModelCard(
                    id=name,
                    created=_STARTED,
                    owned_by=owner,
                    family=spec.family if spec else None,
                    status=statuses[name],
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
    app: FastAPI,
    registry: service.ModelRegistry,
    settings: Settings,
    segment: SegmentFn = service.segment,
    everything: SegmentFn | None = None,
) -> None:
    """Add the API routes, its body limit and its error format to `app` (`segment`, `everything`: `create_router`'s)."""
    app.include_router(create_router(registry, settings, segment, everything))
    # outermost: it wraps whatever is mounted on `app` later (the Gradio UI) as well
    app.add_middleware(RequestGuard, limits=registry.limits, api_keys=settings.api_keys)
    if settings.api_keys:
        log.info(
            "API keys configured: /v1/*, /authentication/validate and Gradio's HTTP API require a bearer key; "
            "the UI stays public unless Gradio auth protects it"
        )
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
        if not _is_api(request) and not request.url.path.startswith("/ui/"):  # the page's routes: our format too
            return await request_validation_exception_handler(request, error)
        message, param, status, code = _describe_validation(jsonable_encoder(error.errors()))
        return error_response(status, message, "invalid_request_error", param, code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException):
        if not _is_api(request):
            return await http_exception_handler(request, error)
        kind = "authentication_error" if error.status_code == 401 else "invalid_request_error"
        return error_response(error.status_code, str(error.detail), kind, None, None, getattr(error, "headers", None))

    @app.exception_handler(ClientDisconnect)
    async def _client_left(request: Request, error: ClientDisconnect):
        # the body never arrived whole (hung up, a broken chunk, or the guard's read deadline): the caller's
        # doing, one short line, and nobody is left to read the answer
        log.info("%s %s: the client left before its body arrived", request.method, request.url.path[:120])
        return error_response(
            400, "The request body did not arrive whole.", "invalid_request_error", None, "incomplete_body"
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return error_response(500, "Internal server error; the request was not processed.", "server_error")
