"""Gradio's routes answer a caller's mistakes with a 4xx and one short log line, not a 500 and a traceback.

Gradio 6 looks up the event a `queue/join` (or `/cancel`, ...) names with `fns[fn_index]`: an unknown
index raised KeyError, answered 500 with ~14 KiB of traceback in the log (twice: the app's handler and
uvicorn's), a log an anonymous client could grow by gigabytes an hour. A KeyError or IndexError raised
inside Gradio's app is an id the caller sent that does not exist: 404 in the API's error format.
"""

from __future__ import annotations

import logging

from fastapi import Request
from fastapi.responses import JSONResponse

log = logging.getLogger("ui")


async def unknown_id(request: Request, failure: Exception) -> JSONResponse:
    log.warning("refused %s %s: unknown id %.40r", request.method, request.url.path[:80], str(failure))
    return JSONResponse(
        {
            "error": {
                "message": "No such event or component on this page.",
                "type": "invalid_request_error",
                "param": None,
                "code": "not_found",
            }
        },
        status_code=404,
    )


def install(gradio_app) -> None:
    """On Gradio's own FastAPI app (its exceptions never reach the outer app's handlers: its own
    ServerErrorMiddleware answers 500 first)."""
    gradio_app.add_exception_handler(KeyError, unknown_id)
    gradio_app.add_exception_handler(IndexError, unknown_id)
