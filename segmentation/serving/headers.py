"""The `x-samhq-replica` response header: which Segmenter replica made a response's segmentation.

Kept apart from the deployments: Ray pickles the ingress class by value, and a ContextVar does not pickle.
"""

from __future__ import annotations

import contextvars

from starlette.types import ASGIApp, Message, Receive, Scope, Send

REPLICA_HEADER = "x-samhq-replica"

_ANSWERED_BY: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("samhq_replica", default=None)


def answered_by(replica: str) -> None:
    """Name the replica in the current request's response (a no-op outside a request)."""
    box = _ANSWERED_BY.get()
    if box is not None:
        box["replica"] = replica


class ReplicaHeader:
    """Adds `x-samhq-replica: <replica>` to a response whose segmentation a Segmenter replica made.

    The segmentation runs in a worker thread with a copy of this request's context: it writes into the
    dict set here, which the copy shares."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        box: dict[str, str] = {}
        token = _ANSWERED_BY.set(box)

        async def send_with_replica(message: Message) -> None:
            if message["type"] == "http.response.start" and "replica" in box:
                headers = [*message.get("headers", []), (REPLICA_HEADER.encode(), box["replica"].encode())]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_replica)
        finally:
            _ANSWERED_BY.reset(token)
