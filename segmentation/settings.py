"""Configuration from environment variables, with the documented defaults in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .models import DEFAULT_MODEL_ID

DECODERS = ("auto", "torch", "onnx")  # SAMHQ_DECODER's values (onnx_decoder.choose_decoder says what each does)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(float(raw))
    except ValueError as error:
        raise ValueError(f"{name} must be a number, got {raw!r}") from error


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError as error:
        raise ValueError(f"{name} must be a number, got {raw!r}") from error


def _env_flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    return default if not raw else raw not in ("0", "false", "no", "off")


def _env_choice(name: str, choices: tuple[str, ...], default: str) -> str:
    raw = os.environ.get(name, "").strip().lower()
    if raw and raw not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
    return raw or default


def _env_list(name: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, "").split(",") if item.strip()]


@dataclass(frozen=True)
class Settings:
    """Every knob of the engine and the server. `Settings.from_env()` reads them."""

    model: str = DEFAULT_MODEL_ID  # SAMHQ_MODEL: the model the UI starts with
    models: tuple[str, ...] = ()  # SAMHQ_MODELS: comma-separated served models (default: SAMHQ_MODEL)
    device: str = "auto"  # SAMHQ_DEVICE: auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # SAMHQ_DTYPE: auto | float32 | bfloat16 | float16
    cache_mb: int = 0  # SAMHQ_CACHE_MB: embedding cache bound; 0 = per-device default
    device_cache_mb: int = 0  # SAMHQ_DEVICE_CACHE_MB: of that, kept in GPU memory; 0 = per-device default
    max_pixels: int = 40_000_000  # SAMHQ_MAX_PIXELS
    max_objects: int = 255  # SAMHQ_MAX_OBJECTS
    max_points: int = 64  # SAMHQ_MAX_POINTS: per object
    max_work_mp: int = 1000  # SAMHQ_MAX_WORK_MP: objects × candidates × composed megapixels per request
    max_body_mb: int = 32  # SAMHQ_MAX_BODY_MB: HTTP request body, every route (Gradio's included)
    body_timeout: float = 20.0  # SAMHQ_BODY_TIMEOUT: seconds a request body may go without a byte, then 408
    body_deadline: float = 120.0  # SAMHQ_BODY_DEADLINE: seconds a whole request body may take, then 408
    bodies_mb: int = 512  # SAMHQ_BODIES_MB: request body bytes in flight for all clients together, then 503
    max_queue: int = 16  # SAMHQ_MAX_QUEUE: requests waiting for the model before 429
    everything_runs: int = 2  # SAMHQ_EVERYTHING_RUNS: API "segment everything" runs at once, then 429
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # SAMHQ_API_KEYS: comma-separated
    preload_examples: bool = True  # SAMHQ_PRELOAD_EXAMPLES: embed the example pictures at start-up
    compile: bool = False  # SAMHQ_COMPILE: torch.compile the image encoder at load
    threads: int = 0  # SAMHQ_THREADS: torch CPU threads; 0 = the cores this process may use
    ui_decode_mb: int = 256  # SAMHQ_UI_DECODE_MB: the page's per-object decodes kept for all sessions together
    # SAMHQ_DECODER: auto | torch | onnx, the prompt decoder's runtime (segmentation/onnx_decoder.py). A server
    # reads it with `from_env`, default auto; Settings built in code (tests comparing with a torch decode) get torch.
    decoder: str = "torch"

    @property
    def served_models(self) -> tuple[str, ...]:
        return self.models or (self.model,)

    @classmethod
    def from_env(cls) -> Settings:
        model = os.environ.get("SAMHQ_MODEL", "").strip() or DEFAULT_MODEL_ID
        models = tuple(_env_list("SAMHQ_MODELS"))
        if models and model not in models:
            models = (model, *models)
        return cls(
            model=model,
            models=models,
            device=os.environ.get("SAMHQ_DEVICE", "auto").strip() or "auto",
            dtype=os.environ.get("SAMHQ_DTYPE", "auto").strip() or "auto",
            cache_mb=_env_int("SAMHQ_CACHE_MB", 0),
            device_cache_mb=_env_int("SAMHQ_DEVICE_CACHE_MB", 0),
            max_pixels=_env_int("SAMHQ_MAX_PIXELS", 40_000_000),
            max_objects=_env_int("SAMHQ_MAX_OBJECTS", 255),
            max_points=_env_int("SAMHQ_MAX_POINTS", 64),
            max_work_mp=_env_int("SAMHQ_MAX_WORK_MP", 1000),
            max_body_mb=_env_int("SAMHQ_MAX_BODY_MB", 32),
            body_timeout=_env_float("SAMHQ_BODY_TIMEOUT", 20.0),
            body_deadline=_env_float("SAMHQ_BODY_DEADLINE", 120.0),
            bodies_mb=_env_int("SAMHQ_BODIES_MB", 512),
            max_queue=_env_int("SAMHQ_MAX_QUEUE", 16),
            everything_runs=_env_int("SAMHQ_EVERYTHING_RUNS", 2),
            api_keys=tuple(_env_list("SAMHQ_API_KEYS")),
            preload_examples=_env_flag("SAMHQ_PRELOAD_EXAMPLES", True),
            compile=_env_flag("SAMHQ_COMPILE", False),
            threads=_env_int("SAMHQ_THREADS", 0),
            ui_decode_mb=_env_int("SAMHQ_UI_DECODE_MB", 256),
            decoder=_env_choice("SAMHQ_DECODER", DECODERS, "auto"),
        )
