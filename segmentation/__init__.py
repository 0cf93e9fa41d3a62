"""SAM-HQ point-prompt segmentation: embed a picture once, segment it in milliseconds per click.

Names are imported lazily, so `segmentation.client` and `segmentation.schemas` work without
loading torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CacheStats": "cache",
    "EmbeddingCache": "cache",
    "Decoded": "engine",
    "Embedding": "engine",
    "LabelMap": "engine",
    "ObjectResult": "engine",
    "Segmentation": "engine",
    "Segmenter": "engine",
    "ImageTooLargeError": "errors",
    "InvalidImageError": "errors",
    "InvalidPromptError": "errors",
    "ModelUnavailableError": "errors",
    "ResourceExhaustedError": "errors",
    "SegmentationError": "errors",
    "UnknownModelError": "errors",
    "CATALOG": "models",
    "DEFAULT_MODEL_ID": "models",
    "ModelSpec": "models",
    "Prompt": "prompts",
    "parse_prompt": "prompts",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'segmentation' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
