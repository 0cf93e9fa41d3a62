"""What the page gets back from a backend (local or remote): numpy arrays and small records, no engine types.

Kept apart from `ui.backend` (which runs the engine in this process) so that a page process in front of a
remote model server (`app.py --backend URL`) imports neither torch nor transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

THUMBNAIL_SIDE = 160


@dataclass(frozen=True)
class PreviewObject:
    value: int  # in the label map: 1..n in prompt order
    score: float
    percent: float  # of the picture's pixels
    candidate: int
    candidates: int


@dataclass(frozen=True)
class Preview:
    labels: np.ndarray  # (preview height, preview width), values 1..n in prompt order
    objects: tuple[PreviewObject, ...]
    thumbnails: tuple[tuple[np.ndarray, float], ...]  # the active one-point object's candidates (mask, score)
    reused: bool  # no object had to be decoded for it
    timings: dict[str, float] = field(default_factory=dict)
    decoded_objects: int = 0  # objects this call ran through the decoder (the others came from the cache)


@dataclass(frozen=True)
class FullMap:
    """The full-size label map of the downloads (the API's map for the same prompt and candidates)."""

    labels: np.ndarray  # (height, width), values 1..n in prompt order
    objects: tuple[Any, ...]  # per object: value, score, area, bbox (as the API's segments)
    cached: bool  # the picture's embedding came from the cache
    image_tokens: int
    point_tokens: int  # one per point, two per box (as the API counts them)

    @property
    def score(self) -> float:
        """Mean predicted IoU of its objects (the API's `score` of a map)."""
        return float(np.mean([obj.score for obj in self.objects])) if self.objects else 0.0
