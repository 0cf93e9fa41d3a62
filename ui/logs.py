"""No page session id in the server's logs: the id is the session's only key (whoever reads it can
act as that visitor), and uvicorn's access log writes every request's path, `/ui/session/<id>/…`; the API's
and the page's own lines name paths too. A path a caller made long is cut, so one request writes a short line."""

from __future__ import annotations

import logging
import re

_SESSION = re.compile(r"(/ui/session/)[^/?\s\"]+")
REDACTED = r"\1<session>"


MAX_ARGUMENT = 300  # characters of one logged string (a 60 KB URL is one request's doing)


def redact(text: str) -> str:
    text = _SESSION.sub(REDACTED, text)
    return text if len(text) <= MAX_ARGUMENT else text[:MAX_ARGUMENT] + "…"


class RedactSessionIds(logging.Filter):
    """Rewrites a record's message and arguments so `/ui/session/<id>` reads `/ui/session/<session>`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        return True


def redact_access_log() -> None:
    """On uvicorn's access and error loggers and those of ours that name paths, once (uvicorn's logging
    config keeps a logger's filters)."""
    for name in ("uvicorn.access", "uvicorn.error", "segmentation.api", "ui"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactSessionIds) for f in logger.filters):
            logger.addFilter(RedactSessionIds())
