"""SAM-HQ point segmentation: the web page and the HTTP API on one port.

    python app.py [--host 0.0.0.0] [--port 7860] [--share] [--model ID] [--models ID,ID] [--device auto]
    python app.py --backend http://segmentation-api:8000 [--backend-key KEY]   # the page alone, no model here

The entry point. The page lives in the `ui` package (a Gradio 6 shell around a browser canvas, its
JSON routes under /ui, the typed session state); the HTTP API in `segmentation.api`. No torch code here,
and with `--backend` nothing here imports torch at all: the page's requirements (requirements-page.txt)
have none.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI

from segmentation.clients import parse_proxies
from segmentation.errors import SegmentationError
from segmentation.guard import RequestGuard
from segmentation.limits import Limits
from segmentation.settings import Settings
from ui.login import parse_accounts
from ui.page import mount_page
from ui.routes import ASSETS, example_pictures  # noqa: F401  (ASSETS: tests and deployments name it)

if TYPE_CHECKING:  # the models' side, imported only when this process runs them (no --backend)
    from segmentation.service import ModelRegistry

log = logging.getLogger("app")


def _spaces_gpu(fn):
    """On ZeroGPU hardware, run `fn` with a GPU attached; a no-op everywhere else."""
    if not os.environ.get("SPACES_ZERO_GPU"):
        return fn
    try:
        import spaces
    except ImportError:
        return fn
    return spaces.GPU(fn)


# ---- serving -------------------------------------------------------------------------------------


def preload(registry: ModelRegistry, settings: Settings) -> threading.Thread:
    """Load the default model and embed the example pictures in the background: the server starts at once."""

    def run() -> None:
        try:
            segmenter = registry.get()
        except SegmentationError:
            return  # the registry has logged the one message; the page shows it as a banner
        if settings.preload_examples:
            for path in example_pictures():
                try:
                    segmenter.embed(str(path))
                except SegmentationError as error:
                    log.warning("could not embed example %s: %s", path, error.message)
            log.info("example pictures embedded")

    thread = threading.Thread(target=run, name="preload", daemon=True)
    thread.start()
    return thread


def build_app(
    settings: Settings | None = None,
    registry: ModelRegistry | None = None,
    backend_url: str | None = None,
    backend_key: str | None = None,
) -> FastAPI:
    """One FastAPI app: the HTTP API under /v1 and /authentication, the Gradio UI at /.

    With `backend_url`, the page alone, its segmentation done by that remote API: no registry, no
    model, no local API (the remote server is the API)."""
    settings = settings or Settings.from_env()
    if backend_url:
        from ui.remote import RemoteBackend

        app = FastAPI(title="SAM-HQ point segmentation (page)", version="0.1.0")
        backend = RemoteBackend(backend_url, settings, api_key=backend_key)
        app.state.backend = backend
        app.add_middleware(RequestGuard, limits=Limits.from_settings(settings))  # the body cap, as install_api adds it
        return mount_page(app, None, settings, backend=backend)
    from segmentation.api import install_api
    from segmentation.service import ModelRegistry

    registry = registry or ModelRegistry(settings)
    app = FastAPI(title="SAM-HQ point segmentation", version="0.1.0")
    install_api(app, registry, settings)
    app.state.registry = registry
    return mount_page(app, registry, settings, gpu=_spaces_gpu)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="SAM-HQ point segmentation: UI + HTTP API on one port.")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--share", action="store_true", help="also serve through a public *.gradio.live link")
    parser.add_argument("--model", help="the default model (SAMHQ_MODEL)")
    parser.add_argument("--models", help="comma-separated served models (SAMHQ_MODELS)")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:N, mps (SAMHQ_DEVICE)")
    parser.add_argument("--dtype", help="auto, float32, bfloat16, float16 (SAMHQ_DTYPE)")
    parser.add_argument("--cache-mb", type=int, help="embedding cache bound in MB (SAMHQ_CACHE_MB)")
    parser.add_argument("--no-preload", action="store_true", help="don't embed the example pictures at start-up")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the image encoder at load (SAMHQ_COMPILE)"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads; 0 = the usable cores (SAMHQ_THREADS)")
    parser.add_argument(
        "--decoder", choices=("auto", "torch", "onnx"), help="the prompt decoder's runtime (SAMHQ_DECODER, auto)"
    )
    parser.add_argument(
        "--backend",
        default=os.environ.get("SAMHQ_BACKEND_URL") or None,
        help="segment through this remote API (ours or the Ray Serve app); no model here (SAMHQ_BACKEND_URL)",
    )
    parser.add_argument(
        "--backend-key",
        default=os.environ.get("SAMHQ_BACKEND_KEY") or None,
        help="the API key the remote backend expects (SAMHQ_BACKEND_KEY)",
    )
    parser.add_argument("--ui-sessions", type=int, help="page sessions kept at once (SAMHQ_UI_SESSIONS, 100)")
    parser.add_argument(
        "--ui-session-ttl", type=float, help="idle seconds before a page session ends (SAMHQ_UI_SESSION_TTL)"
    )
    parser.add_argument(
        "--ui-sessions-per-client", type=int, help="page sessions one client may hold (SAMHQ_UI_SESSIONS_PER_CLIENT, 8)"
    )
    parser.add_argument(
        "--auth",
        action="append",
        metavar="USER:PASS",
        help="require this login for the page and its /ui routes (repeatable; SAMHQ_AUTH, comma-separated)",
    )
    parser.add_argument(
        "--trusted-proxies",
        help="addresses/networks of reverse proxies whose X-Forwarded-For names the client (SAMHQ_TRUSTED_PROXIES)",
    )
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    settings = Settings.from_env()
    changes: dict[str, Any] = {}
    if args.model:
        changes["model"] = args.model
    if args.models:
        changes["models"] = tuple(m.strip() for m in args.models.split(",") if m.strip())
    if args.device:
        changes["device"] = args.device
    if args.dtype:
        changes["dtype"] = args.dtype
    if args.cache_mb is not None:
        changes["cache_mb"] = args.cache_mb
    if args.no_preload:
        changes["preload_examples"] = False
    if args.compile:
        changes["compile"] = True
    if args.threads is not None:
        changes["threads"] = args.threads
    if args.decoder:
        changes["decoder"] = args.decoder
    settings = dataclasses.replace(settings, **changes)
    if settings.models and settings.model not in settings.models:
        settings = dataclasses.replace(settings, models=(settings.model, *settings.models))
    return settings


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    settings = settings_from(args)
    if args.ui_sessions is not None:
        os.environ["SAMHQ_UI_SESSIONS"] = str(args.ui_sessions)
    if args.ui_session_ttl is not None:
        os.environ["SAMHQ_UI_SESSION_TTL"] = str(args.ui_session_ttl)
    if args.ui_sessions_per_client is not None:
        os.environ["SAMHQ_UI_SESSIONS_PER_CLIENT"] = str(args.ui_sessions_per_client)
    if args.auth:
        try:
            parse_accounts(args.auth)  # a malformed USER:PASS stops here, with the message
        except ValueError as error:
            raise SystemExit(str(error)) from None
        os.environ["SAMHQ_AUTH"] = ",".join(args.auth)
    if args.trusted_proxies is not None:
        os.environ["SAMHQ_TRUSTED_PROXIES"] = args.trusted_proxies
    proxies = [str(network) for network in parse_proxies(os.environ.get("SAMHQ_TRUSTED_PROXIES", ""))]
    if args.backend:  # the page only: no registry, no torch threads, nothing preloaded
        app = build_app(settings, backend_url=args.backend, backend_key=args.backend_key)
    else:
        from segmentation.models import fit_cpu_threads
        from segmentation.service import ModelRegistry

        fit_cpu_threads(settings.threads)
        registry = ModelRegistry(settings)
        app = build_app(settings, registry)
        preload(registry, settings)
    if args.share:
        # gr.Blocks.launch(share=True) would serve its own app without our API routes; instead the
        # tunnel Gradio uses for share links points at this server, UI and API together.
        threading.Thread(target=_open_share_link, args=(args.host, args.port), daemon=True).start()
    what = "the page (segmentation by the backend)" if args.backend else "UI and API"
    log.info("serving %s on http://%s:%d", what, args.host, args.port)
    log.info(
        "page: %s; clients by %s",
        "login required (--auth / SAMHQ_AUTH)" if os.environ.get("SAMHQ_AUTH") else "open to anyone",
        f"X-Forwarded-For from {', '.join(proxies)}" if proxies else "peer address (no trusted proxies)",
    )
    # uvicorn trusts X-Forwarded-For from loopback by default; only the named proxies here (ui/clients.py)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", forwarded_allow_ips=proxies)


def _open_share_link(host: str, port: int) -> None:
    import secrets

    from gradio import networking

    time.sleep(2)  # let uvicorn bind first
    try:
        url = networking.setup_tunnel(
            "127.0.0.1" if host == "0.0.0.0" else host, port, secrets.token_urlsafe(32), None, None
        )
        log.info("public share link: %s (UI and API)", url)
    except Exception as error:  # no network, blocked, ...
        log.error("could not create a share link: %s", error)


if __name__ == "__main__":
    main()
