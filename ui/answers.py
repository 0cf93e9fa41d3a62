"""The page's JSON answers and small request bodies, shared by every /ui route module.

Errors have the API's shape (`{"error": {"message", "type", "param", "code"}}`) so the browser shows one kind
of message whatever route refused it; a small JSON body (an edit, Everything's knobs) is read no further than
it may be, so a chunked or endless body costs a few KB at most.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

SESSION_EXPIRED = "This page's session has expired: reload the page."


def error(status: int, message: str, code: str = "invalid_request", **extra: Any) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}, **extra},
        status_code=status,
    )


def expired() -> JSONResponse:
    return error(404, SESSION_EXPIRED, "session_expired")


async def small_json_object(request: Request, limit: int, what: str) -> dict[str, Any] | JSONResponse:
    """The body as a JSON object of at most `limit` bytes, or the error to answer (413 past the limit, read no
    further; 400 for anything but a JSON object, a few KB of nested brackets included)."""
    too_large = error(413, f"{what} is a few bytes.", "too_large")
    announced = request.headers.get("content-length", "")
    if announced.isdigit() and int(announced) > limit:  # refused before a byte of the body is read
        return too_large
    raw = b""
    try:
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                return too_large
    except ClientDisconnect:  # hung up, a broken chunk, or the guard's read deadline: nobody reads this
        return error(400, f"{what} did not arrive whole.", "incomplete_body")
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, RecursionError):  # RecursionError: deeply nested brackets
        return error(400, f"{what} is not JSON.")
    if not isinstance(body, dict):
        return error(400, f"{what} must be a JSON object.")
    return body
