"""SAM-HQ point-prompt segmentation: embed a picture once, segment it in milliseconds per click."""

from .cache import CacheStats, EmbeddingCache
from .engine import Embedding, LabelMap, ObjectResult, Segmentation, Segmenter
from .errors import (
    ImageTooLargeError,
    InvalidImageError,
    InvalidPromptError,
    ModelUnavailableError,
    ResourceExhaustedError,
    SegmentationError,
    UnknownModelError,
)
from .models import CATALOG, DEFAULT_MODEL_ID, ModelSpec
from .prompts import Prompt, parse_prompt

__all__ = [
    "CATALOG",
    "DEFAULT_MODEL_ID",
    "CacheStats",
    "Embedding",
    "EmbeddingCache",
    "ImageTooLargeError",
    "InvalidImageError",
    "InvalidPromptError",
    "LabelMap",
    "ModelSpec",
    "ModelUnavailableError",
    "ObjectResult",
    "Prompt",
    "ResourceExhaustedError",
    "Segmentation",
    "SegmentationError",
    "Segmenter",
    "UnknownModelError",
    "parse_prompt",
]
