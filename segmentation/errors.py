"""The errors the engine raises, each with a stable `code` the web layers map to a status.

Everything a caller can cause is a `ValueError` subclass (prompts, pictures, model names),
so plain Python callers can catch the family they expect; `param` names the offending
input field where there is one.
"""

from __future__ import annotations


class SegmentationError(Exception):
    """Base class: `code` is machine-readable, `param` the input it concerns (or None)."""

    code = "segmentation_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:  # a more precise code than the class's, e.g. "invalid_size"
            self.code = code


class InvalidPromptError(SegmentationError, ValueError):
    """Points or labels malformed, out of the picture, or over the limits."""

    code = "invalid_prompt"


class RequestLimitError(SegmentationError, ValueError):
    """A request over what one request may cost (`segmentation.limits`): too many objects, points,
    candidates or output pixels, or too much work in all. The caller's to fix: a 400."""

    code = "limit_exceeded"


class InvalidImageError(SegmentationError, ValueError):
    """Bytes that are not a picture Pillow can decode, or an unsupported array."""

    code = "invalid_image"


class ImageTooLargeError(InvalidImageError):
    """More pixels than the configured limit (checked from the header, before decoding)."""

    code = "image_too_large"


class UnknownModelError(SegmentationError, ValueError):
    """A model name that is neither in the catalog nor a local checkpoint folder."""

    code = "model_not_found"


class ModelUnavailableError(SegmentationError, RuntimeError):
    """A known model whose weights cannot be loaded right now (offline, no cache, corrupt)."""

    code = "model_unavailable"


class UnsupportedImageFormatError(InvalidImageError):
    """A picture in a format we do not decode (only the formats the README lists, no external programs)."""

    code = "unsupported_image_format"


class ResourceExhaustedError(SegmentationError, RuntimeError):
    """Out of memory while running the model; the cache has been shed, a retry may succeed."""

    code = "resource_exhausted"
