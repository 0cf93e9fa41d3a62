"""One login for the whole page: Gradio's own (`--auth USER:PASS`, `SAMHQ_AUTH`) guards the page, and the
same login cookie guards every `/ui` route, which Gradio's `auth=` does not cover (they are ours, beside it).

Gradio's `/login` sets `access-token-<cookie_id>` (and an `-unsecure-` twin for plain HTTP) to a token it
keeps in `App.tokens`; a `/ui` request is let through only with a cookie Gradio knows. Without a login
configured nothing is checked: the open demo is the default.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from http.cookies import CookieError, SimpleCookie
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

PROTECTED_PREFIX = "/ui/"
# Gradio's routes without its own login check: its heartbeat stream stays open for as long as the client wants
UNCHECKED_GRADIO = ("/gradio_api/heartbeat/",)


def parse_accounts(spec: str | list[str] | None) -> list[tuple[str, str]]:
    """`"user:pass,other:secret"` (or a list of `user:pass`) → Gradio's auth list; the password may hold ':'."""
    items = spec.split(",") if isinstance(spec, str) else (spec or [])
    accounts = []
    for item in (part.strip() for part in items):
        if not item:
            continue
        user, colon, password = item.partition(":")
        if not colon or not user or not password:
            raise ValueError("SAMHQ_AUTH / --auth takes USER:PASS (comma-separated for several accounts)")
        accounts.append((user, password))
    return accounts


def accounts_from_env() -> list[tuple[str, str]]:
    return parse_accounts(os.environ.get("SAMHQ_AUTH", ""))


def logged_in_user(gradio_app: Any, cookie_header: str) -> str | None:
    """The user Gradio's login cookie names, or None."""
    try:
        cookies = SimpleCookie(cookie_header)
    except CookieError:
        return None
    for name in (f"access-token-{gradio_app.cookie_id}", f"access-token-unsecure-{gradio_app.cookie_id}"):
        if name in cookies:
            user = gradio_app.tokens.get(cookies[name].value)
            if user is not None:
                return user
    return None


class PageLogin:
    """ASGI middleware: with a login configured, a `/ui` request (or one to Gradio's heartbeat, which Gradio
    leaves open) without Gradio's login cookie is a 401,
    answered from the headers before any body is read. `gradio_app` is looked up at the first request
    (the Gradio app is mounted after this middleware is added)."""

    def __init__(self, app: ASGIApp, gradio_app: Callable[[], Any]):
        self.app, self.gradio_app = app, gradio_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith((PROTECTED_PREFIX, *UNCHECKED_GRADIO)):
            gradio_app = self.gradio_app()
            if gradio_app is not None and gradio_app.auth is not None:
                header = b"; ".join(v for k, v in scope.get("headers") or () if k == b"cookie").decode("latin-1")
                if logged_in_user(gradio_app, header) is None:
                    await _unauthorized(send)
                    return
        await self.app(scope, receive, send)


async def _unauthorized(send: Send) -> None:
    body = json.dumps(
        {
            "error": {
                "message": "Log in first: reload the page to see the login form.",
                "type": "authentication_error",
                "param": None,
                "code": "login_required",
            }
        }
    ).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 401, "headers": headers + [(b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
