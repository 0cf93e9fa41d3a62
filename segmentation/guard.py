"""The ASGI guard in front of every route (the API's and Gradio's): what is refused before a body is read.

* API keys: with keys configured, every programmatic route that segments (`/v1/*`,
  `/authentication/*`, Gradio's HTTP API `/gradio_api/call|run|api/...`) answers 401 to a
  request without a valid bearer key, from its headers alone: the body is never read.
* A body cap on every route (the page's and Gradio's too), `max_body_bytes` from
  `segmentation.limits`. A larger `Content-Length` is a 413 at once; a body that
  streams past the cap (chunked) is a 413 as soon as it does, and the rest is not read.

The page (its `/ui` routes) stays reachable without a key: protect it with a private Space or an
authenticating proxy in front (README; Gradio's own auth does not cover `/ui`).
"""

from __future__ import annotations

import hmac
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .limits import Limits

KEYED_PREFIXES = ("/v1/", "/authentication/", "/gradio_api/call/", "/gradio_api/run/", "/gradio_api/api/")


def _error(status: int, message: str, type_: str, code: str, headers: dict[str, str] | None = None):
    """A plain ASGI answer in the API's error format (no framework needed this early)."""
    body = json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]

    async def answer(send: Send) -> None:
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})

    return answer


def key_is_valid(authorization: bytes, keys: list[bytes]) -> bool:
    """`Authorization: Bearer <key>` against every key, always all of them (timing says nothing)."""
    scheme, _, token = authorization.partition(b" ")
    supplied = token.strip() if scheme.lower() == b"bearer" else b""
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(supplied, key)
    return matched


class RequestGuard:
    """See the module docstring. `install_api` puts it outermost, so it wraps the mounted Gradio app too."""

    def __init__(self, app: ASGIApp, limits: Limits, api_keys: tuple[str, ...] = ()):
        self.app, self.limits = app, limits
        self.keys = [key.encode() for key in api_keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        headers = dict(scope.get("headers") or [])
        if (
            self.keys
            and path.startswith(KEYED_PREFIXES)
            and not key_is_valid(headers.get(b"authorization", b""), self.keys)
        ):
            await _error(
                401,
                "Missing or invalid API key: send 'Authorization: Bearer <key>'.",
                "authentication_error",
                "invalid_api_key",
                {"WWW-Authenticate": "Bearer", "Connection": "close"},  # the unread body is never wanted
            )(send)
            return
        cap = self.limits.max_body_bytes
        too_large = _error(
            413,
            f"The request body is larger than the {cap / 2**20:g} MiB limit.",
            "invalid_request_error",
            "request_too_large",
            {"Connection": "close"},
        )
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > cap:
            await too_large(send)
            return
        received = 0
        started = refused = False

        async def counting_receive() -> Message:
            # Past the cap: answer 413 now and tell the app the client left, so it stops reading.
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cap:
                    refused = True
                    if not started:
                        await too_large(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # our 413 is the answer; drop what the app says after the disconnect
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counting_receive, guarded_send)
