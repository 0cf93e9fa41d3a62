"""The Gradio 6 shell of the page: one gr.HTML holding the canvas page (ui/static), the help text,
and Gradio's "Use via API" `/segment` endpoint when no API keys are set. Mounted with the page's
JSON routes on the FastAPI app that also serves the HTTP API.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import gradio as gr
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from segmentation.clients import ClientIdentity
from segmentation.errors import SegmentationError
from segmentation.limits import Limits
from segmentation.models import CATALOG
from segmentation.schemas import build_response
from segmentation.settings import Settings

from . import gradio_errors, login
from .guard import guard_file_inputs
from .preview_routes import CrossOriginIsolation, preview_options
from .remote import RemoteBackend
from .routes import ASSETS, PageRoutes, install_page_routes
from .sessions import SessionStore
from .workflow import WorkflowOptions

if TYPE_CHECKING:
    from segmentation.service import ModelRegistry

STATIC = Path(__file__).parent / "static"


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    return float(raw) if raw else default


CLOSED_GRADIO_ROUTES = ("/gradio_api/upload", "/gradio_api/process_recording")


class NoGradioUploads:
    """The page uploads through /ui; nothing uses Gradio's own upload routes, so they are closed: no
    anonymous files pile up in Gradio's cache (what remains there is deleted by `delete_cache`), and
    no screen recording is handed to ffmpeg (`process_recording`)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].rstrip("/").endswith(CLOSED_GRADIO_ROUTES):
            response = JSONResponse(
                {
                    "error": {
                        "message": "Uploads go through the page.",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "forbidden",
                    }
                },
                status_code=403,
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def page_options() -> dict[str, float]:
    """The page's own knobs (README): sessions kept (in all, per client), idle expiry, their disk budget,
    Gradio cache clean-up."""
    return {
        "sessions": int(_env_number("SAMHQ_UI_SESSIONS", 100)),
        "sessions_per_client": int(_env_number("SAMHQ_UI_SESSIONS_PER_CLIENT", 8)),
        "session_ttl": _env_number("SAMHQ_UI_SESSION_TTL", 3600),
        "disk_mb": _env_number("SAMHQ_UI_DISK_MB", 2048),
        "cache_age": int(_env_number("SAMHQ_UI_CACHE_AGE", 3600)),
        "pictures_per_session": int(_env_number("SAMHQ_UI_PICTURES_PER_SESSION", 500)),
        "export_mb": _env_number("SAMHQ_UI_EXPORT_MB", 1024),
        "export_seconds": _env_number("SAMHQ_UI_EXPORT_SECONDS", 300),
    }


def _gradio_app(app: FastAPI):
    """Gradio's own FastAPI app, mounted inside `app` (None before it is)."""
    return next((r.app for r in app.routes if hasattr(getattr(r, "app", None), "blocks")), None)


def api_segment_function(registry: ModelRegistry) -> Callable[..., dict]:
    from segmentation import service
    from segmentation.api import APIError, decode_base64_image

    def segment(
        image_b64: str, segment_prompt: list, point_labels: list | None = None, model: str = "", n: int = 1
    ) -> dict:
        """Segment a base64 picture from points [[[x, y], ...], ...]; returns the same JSON as POST /v1/images/segmentations."""
        try:
            result = service.segment(
                registry,
                image=decode_base64_image(image_b64),
                points=segment_prompt,
                labels=point_labels,
                model=model or None,
                candidates=int(n),
            )
        except (SegmentationError, APIError) as error:
            raise gr.Error(error.message, print_exception=False) from None  # the caller's mistake: no traceback
        return build_response(result).model_dump()

    return segment


def build_blocks(
    registry: ModelRegistry | None,
    settings: Settings,
    cache_age: int,
    gpu=lambda fn: fn,
    served_models: tuple[str, ...] | None = None,
) -> gr.Blocks:
    """The Gradio shell. Without a registry (the page of a remote backend) there is no `/segment`
    endpoint: the remote server is the API."""
    html = (STATIC / "page.html").read_text()
    script = (STATIC / "page.js").read_text()
    preview = (STATIC / "preview.js").read_text()  # the hover preview, beside the page (ui/preview_routes.py)
    served = ", ".join(f"`{name}`" for name in (served_models or registry.served))
    with gr.Blocks(title="SAM-HQ point segmentation", delete_cache=(max(1, cache_age // 4), cache_age)) as demo:
        gr.HTML(
            html,
            js_on_load=f"({script})(element); ({preview})(element);",
            elem_id="samhq-page",
            apply_default_css=False,
        )
        with gr.Accordion("How it works", open=False):
            gr.Markdown(
                "Upload a picture, then **click** on it: each click adds a point and segments at once. "
                "*Include* points add to the active object, *exclude* points carve it out; in *Box* mode a drag "
                "(or two clicks at opposite corners) draws the object's box; **New object** starts the next one. The picture is embedded once (seconds on a CPU); clicks after that take a "
                "fraction of a second, and clicks made meanwhile are kept and applied in order.\n\n"
                "**score** is the model's own estimate of the outline's quality (predicted IoU, 0–1); "
                "**value** is the object's number in `mask.png` (0 = background). The downloads are built at "
                "full size for the prompt on screen and are the HTTP API's bytes for it.\n\n"
                "Catalog: "
                + ", ".join(f"`{spec.id}` ({spec.encoder})" for spec in CATALOG.values())
                + f". Served here: {served}."
            )
        if (
            registry is not None and not settings.api_keys
        ):  # with keys set, Gradio's own endpoint would be a keyless way in
            gr.api(gpu(api_segment_function(registry)), api_name="segment")
    demo.queue(default_concurrency_limit=2, max_size=settings.max_queue)
    guard_file_inputs(demo, [ASSETS])
    return demo


def mount_page(
    app: FastAPI,
    registry: ModelRegistry | None,
    settings: Settings,
    gpu=lambda fn: fn,
    backend: RemoteBackend | None = None,
) -> FastAPI:
    """The page's routes under /ui and the Gradio shell at /, on `app` (which already serves the API,
    or, given a remote `backend` and no registry, serves the page alone)."""
    options = page_options()
    store = SessionStore(
        capacity=options["sessions"],
        ttl=options["session_ttl"],
        per_client=options["sessions_per_client"],
        disk_bytes=int(options["disk_mb"] * 2**20),
        root=os.environ.get("SAMHQ_UI_SESSIONS_DIR") or None,
    )
    if backend is None:  # the models run in this process (never imported by a page in front of a remote API)
        from .backend import LocalBackend

        backend = LocalBackend(registry, settings)
    routes = PageRoutes(
        backend,
        store,
        max_body_bytes=settings.max_body_mb * 2**20,
        # the snippet names the API: with a remote backend, that server (this one serves the page only)
        public_url=os.environ.get("SAMHQ_PUBLIC_URL") or getattr(backend, "url", None),
        options=WorkflowOptions(
            pictures_per_session=max(1, int(options["pictures_per_session"])),
            export_bytes=int(options["export_mb"] * 2**20),
            export_seconds=float(options["export_seconds"]),
        ),
    )
    install_page_routes(app, routes, ClientIdentity.from_env())
    app.add_middleware(NoGradioUploads)
    if preview_options()["isolate"]:  # wasm threads for the hover preview (ui/preview_routes.py)
        app.add_middleware(CrossOriginIsolation)
    accounts = login.accounts_from_env()
    app.add_middleware(login.PageLogin, gradio_app=lambda: _gradio_app(app))
    app.state.page = routes
    demo = build_blocks(registry, settings, options["cache_age"], gpu, served_models=routes.backend.models)
    mounted = gr.mount_gradio_app(
        app,
        demo,
        path="/",
        allowed_paths=[str(ASSETS)],
        max_file_size=Limits.from_settings(settings).max_picture_bytes,  # the API's picture-file rule
        css=(STATIC / "page.css").read_text(),
        auth=accounts or None,  # the same login then guards /ui (login.PageLogin)
    )
    gradio_errors.install(_gradio_app(mounted))
    return mounted
