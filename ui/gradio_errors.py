"""Gradio's routes answer a caller's mistakes with a 4xx and one short log line, not a 500 and a traceback.

Gradio 6 looks up the event a `queue/join` (or `/cancel`, ...) names with `fns[fn_index]`: an unknown
index raised KeyError, answered 500 with ~14 KiB of traceback in the log (twice: the app's handler and
uvicorn's), a log an anonymous client could grow by gigabytes an hour. So, inside Gradio's app:

* a KeyError or IndexError is an id the caller sent that does not exist, and `FnIndexInferError` an API
  name that does not exist (`/gradio_api/run/nosuch`): 404 in the API's error format;
* a ValueError is inputs that do not fit the event (`{"data": []}` for an event of five inputs): 400;
* `queue/data` for a session the queue does not know is answered 404 before Gradio starts its event
  stream (Gradio raises its 404 inside the stream, after the 200 has gone: a traceback per request);
* Gradio's one-step API (`/gradio_api/run/<name>`) answers any error of an event 500, printing a traceback
  unless it is a `gr.Error` that asks not to: inputs that do not fit the event become such a `gr.Error`,
  and a 500 carrying a `gr.Error`'s message (the caller's mistake: our events raise `gr.Error` only for
  those; anything else carries no message) is answered 400.
"""

from __future__ import annotations

import json
import logging
from urllib.parse import parse_qs

import gradio as gr
from fastapi import Request
from fastapi.responses import JSONResponse
from gradio.route_utils import FnIndexInferError

log = logging.getLogger("ui")


async def unknown_id(request: Request, failure: Exception) -> JSONResponse:
    log.warning("refused %s %s: unknown id %.40r", request.method, request.url.path[:80], str(failure))
    return error_json(404, "No such event or component on this page.", "not_found")


async def bad_inputs(request: Request, failure: Exception) -> JSONResponse:
    log.warning("refused %s %s: %.80s", request.method, request.url.path[:80], str(failure))
    return error_json(400, "These inputs do not fit this event.", "invalid_request")


class UnknownQueueSession:
    """`GET …/queue/data?session_hash=X` for a session Gradio's queue does not hold: 404 at once."""

    def __init__(self, app, gradio_app):
        self.app, self.gradio_app = app, gradio_app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].endswith("/queue/data"):
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            session = (query.get("session_hash") or [""])[0]
            if session not in self.gradio_app.get_blocks()._queue.pending_messages_per_session:
                log.warning("refused queue/data: unknown session %.20r", session)
                await error_json(404, "No such session in this page's queue.", "not_found")(scope, receive, send)
                return
        await self.app(scope, receive, send)


class CallersMistakesAre4xx:
    """On `/gradio_api/run/…`: Gradio's 500 with a `gr.Error`'s message becomes a 400 (see the module)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or "/run/" not in scope["path"]:
            await self.app(scope, receive, send)
            return
        held: dict | None = None

        async def send_or_hold(message) -> None:
            nonlocal held
            if message["type"] == "http.response.start" and message["status"] == 500:
                held = message  # decided by the body: a small JSON error payload
                return
            if held is not None and message["type"] == "http.response.body":
                start, held = held, None
                try:
                    caller = isinstance(json.loads(message.get("body", b"")).get("error"), str)
                except (ValueError, AttributeError):
                    caller = False
                await send({**start, "status": 400} if caller else start)
            await send(message)

        await self.app(scope, receive, send_or_hold)


def inputs_are_the_callers(blocks) -> None:
    """Inputs that do not fit an event (`{"data": []}` for five inputs) are a `gr.Error` without traceback."""
    validate = blocks.validate_inputs

    def checked(block_fn, inputs) -> None:
        try:
            validate(block_fn, inputs)
        except ValueError:
            raise gr.Error(
                f"This event takes {len(block_fn.inputs)} inputs; {len(inputs)} were sent.", print_exception=False
            ) from None

    blocks.validate_inputs = checked


def error_json(status: int, message: str, code: str) -> JSONResponse:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    return JSONResponse(body, status_code=status)


def install(gradio_app) -> None:
    """On Gradio's own FastAPI app (its exceptions never reach the outer app's handlers: its own
    ServerErrorMiddleware answers 500 first)."""
    gradio_app.add_exception_handler(KeyError, unknown_id)
    gradio_app.add_exception_handler(IndexError, unknown_id)
    gradio_app.add_exception_handler(FnIndexInferError, unknown_id)
    gradio_app.add_exception_handler(ValueError, bad_inputs)
    gradio_app.add_middleware(UnknownQueueSession, gradio_app=gradio_app)
    gradio_app.add_middleware(CallersMistakesAre4xx)
    inputs_are_the_callers(gradio_app.get_blocks())
