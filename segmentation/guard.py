"""The ASGI guard in front of every route (the API's and Gradio's): what is refused before a body is read.

* API keys: with keys configured, every programmatic route that segments (`/v1/*`,
  `/authentication/*`, Gradio's HTTP API `/gradio_api/call|run|api/...`) answers 401 to a
  request without a valid bearer key, from its headers alone: the body is never read.
* A body cap on every route (the page's and Gradio's too), `max_body_bytes` from
  `segmentation.limits`. A larger `Content-Length` is a 413 at once; a body that
  streams past the cap (chunked) is a 413 as soon as it does, and the rest is not read.
* A read deadline on every body: a pause longer than `body_timeout` seconds between two chunks, or a
  body not whole after `body_deadline` seconds, is a 408 and the connection is closed. A client that
  never sends its last byte holds its connection for seconds, not for good; what the route had
  buffered is freed and handed back to the system (`malloc_trim`) when it is refused.
* Body bytes in flight are bounded per client (`segmentation.clients`: the peer address, or the forwarded one
  from a proxy the operator named: `per_client_bodies`, twice
  the body cap by default) and for all clients together (`bodies_bytes`, `SAMHQ_BODIES_MB`): a chunk that
  would pass either is a 429 (the client's) or a 503 (everybody's) and the connection is closed, read no
  further. A request's bytes count from their arrival until its answer is sent or its client is gone, on
  every route (an upload the page streams to disk too): unfinished bodies can't pile up in memory.
* Every early answer closes the connection (`Connection: close`): the server never drains an unread
  body (uvicorn would otherwise read and discard it, past the cap, to reuse the connection).

The page (its `/ui` routes) stays reachable without an API key: `--auth USER:PASS` (`SAMHQ_AUTH`) puts it
behind Gradio's login, which `ui.login` extends to every `/ui` route (README: what is public in each mode).
"""

from __future__ import annotations

import asyncio
import hmac
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .clients import ClientIdentity
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

    def __init__(
        self,
        app: ASGIApp,
        limits: Limits,
        api_keys: tuple[str, ...] = (),
        bodies_bytes: int | None = None,
        per_client_bodies: int | None = None,
        clients: ClientIdentity | None = None,
    ):
        self.app, self.limits = app, limits
        self.clients = clients or ClientIdentity.from_env()  # behind a named proxy, the forwarded client
        self.keys = [key.encode() for key in api_keys]
        self.bodies_bytes = limits.bodies_bytes if bodies_bytes is None else bodies_bytes
        self.per_client_bodies = 2 * limits.max_body_bytes if per_client_bodies is None else per_client_bodies
        self.in_flight = 0  # body bytes of requests not yet ended, all clients (one event loop: no lock)
        self.by_client: dict[str, int] = {}

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
        peer = self.clients.of(scope)
        too_many = _error(
            429,
            "Too many request bodies are arriving from your address at once: wait for one to finish.",
            "rate_limit_exceeded",
            "too_many_bodies",
            {"Connection": "close"},
        )
        server_full = _error(
            503,
            "The server is receiving as many request bodies as it can right now: try again in a moment.",
            "server_error",
            "server_busy",
            {"Connection": "close"},
        )
        # a request with no body is whole from the start (the app may never read it)
        whole = length in (None, b"0") and b"transfer-encoding" not in headers
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.body_deadline

        async def counting_receive() -> Message:
            # Past the cap or the deadline: answer now and tell the app the client left, so it stops reading.
            nonlocal received, refused, whole
            if refused:
                return {"type": "http.disconnect"}
            if whole:  # after the body, the app only waits for the client to leave: no deadline
                return await receive()
            wait = max(0.0, min(self.limits.body_timeout, deadline - loop.time()))
            try:
                message = await asyncio.wait_for(receive(), wait)
            except asyncio.TimeoutError:
                refused = True
                if not started:
                    await _error(
                        408,
                        f"The request body did not arrive in time (a pause over {self.limits.body_timeout:g} s, "
                        f"or more than {self.limits.body_deadline:g} s in all).",
                        "invalid_request_error",
                        "request_timeout",
                        {"Connection": "close"},
                    )(send)
                return {"type": "http.disconnect"}
            if message["type"] == "http.disconnect":
                refused = True  # the client left mid-body: nothing more comes, and its memory goes back
            elif message["type"] == "http.request":
                size = len(message.get("body", b""))
                refusal = None
                if self.by_client.get(peer, 0) + size > self.per_client_bodies:
                    refusal = too_many
                elif self.in_flight + size > self.bodies_bytes:
                    refusal = server_full
                if refusal is not None:
                    refused = True
                    if not started:
                        await refusal(send)
                    return {"type": "http.disconnect"}
                received += size
                self.in_flight += size
                self.by_client[peer] = self.by_client.get(peer, 0) + size
                whole = not message.get("more_body", False)
                if received > cap:
                    refused = True
                    if not started:
                        await too_large(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # our answer stands; drop what the app says after the disconnect
            closes = any(k.lower() == b"connection" for k, _ in message.get("headers", []))
            if message["type"] == "http.response.start" and not whole and not closes:
                # answered before its body was read (a 404, a 413 of the route's own): close, never drain
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        finally:
            self.in_flight -= received
            left = self.by_client.get(peer, 0) - received
            if left > 0:
                self.by_client[peer] = left
            else:
                self.by_client.pop(peer, None)
            if refused:
                await _give_memory_back()


_trim_pending = [False]


async def _give_memory_back() -> None:
    """What an abandoned body's route had buffered, back to the system: once for a burst of hang-ups,
    a moment after the first (the others finish meanwhile), off the event loop."""
    from .service import give_memory_back  # lazily: the guard itself needs no torch

    if _trim_pending[0]:
        return
    _trim_pending[0] = True
    try:
        await asyncio.sleep(0.5)
        await asyncio.to_thread(give_memory_back)
    finally:
        _trim_pending[0] = False
