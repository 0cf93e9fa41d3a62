"""Shared pieces for the API tests: an app with the API installed, pictures as request bodies."""

from __future__ import annotations

import base64
import io

import numpy as np
from conftest import HQ_ID, SAM_ID, make_picture
from fastapi import FastAPI
from PIL import Image

from segmentation.api import install_api
from segmentation.service import ModelRegistry
from segmentation.settings import Settings


def build_api(**overrides) -> tuple[FastAPI, ModelRegistry]:
    settings = Settings(model=HQ_ID, models=(HQ_ID, SAM_ID), preload_examples=False, device="cpu", **overrides)
    registry = ModelRegistry(settings)
    app = FastAPI()
    install_api(app, registry, settings)
    return app, registry


def png_b64(picture: np.ndarray | None = None, fmt: str = "PNG") -> str:
    picture = make_picture(160, 100) if picture is None else picture
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def body(**overrides) -> dict:
    payload = {"model": HQ_ID, "image_prompt": png_b64(), "segment_prompt": [[[40, 30]], [[120, 60], [130, 70]]]}
    payload.update(overrides)
    return payload
