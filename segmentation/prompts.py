"""Point prompts: validation with messages that name the culprit, and coordinate transforms.

A prompt is a list of objects; an object is a list of points `[x, y]` in the pixels of the
upright picture, each with a label: 1 include, 0 exclude.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any

import numpy as np

from .errors import InvalidPromptError

INCLUDE = 1
EXCLUDE = 0
# Official SAM pads a point list with label -1, "not a point": the model was trained on that
# learned embedding and the position is discarded. (transformers' processor pads with -10,
# a zero vector the model never saw in training.)
PAD_LABEL = -1


@dataclass(frozen=True)
class ObjectPrompt:
    points: tuple[tuple[float, float], ...]
    labels: tuple[int, ...]

    @property
    def ambiguous(self) -> bool:
        """One point could mean part, whole or group: SAM then proposes several candidates."""
        return len(self.points) == 1


@dataclass(frozen=True)
class Prompt:
    objects: tuple[ObjectPrompt, ...]

    @property
    def point_count(self) -> int:
        return sum(len(obj.points) for obj in self.objects)

    def __len__(self) -> int:
        return len(self.objects)


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _where(obj: int, point: int | None = None) -> str:
    return f"object {obj + 1}" + (f", point {point + 1}" if point is not None else "")


def parse_prompt(
    points: Any,
    labels: Any = None,
    *,
    width: int,
    height: int,
    max_objects: int = 255,
    max_points: int = 64,
) -> Prompt:
    """Validate nested lists `[[[x, y], ...], ...]` (and labels of the same nesting) into a Prompt.

    Raises InvalidPromptError naming the offending object/point (1-based, as people count).
    """
    if isinstance(points, np.ndarray):
        points = points.tolist()
    if not isinstance(points, (list, tuple)):
        raise InvalidPromptError(
            "The prompt must be a list of objects, each a list of [x, y] points, e.g. [[[120, 80]]].",
            param="segment_prompt",
        )
    if not points:
        raise InvalidPromptError(
            "The prompt has no objects: give at least one object with one point.", param="segment_prompt"
        )
    if len(points) > max_objects:
        raise InvalidPromptError(
            f"The prompt has {len(points)} objects; the limit is {max_objects}.", param="segment_prompt"
        )
    if labels is not None:
        if isinstance(labels, np.ndarray):
            labels = labels.tolist()
        if not isinstance(labels, (list, tuple)) or len(labels) != len(points):
            count = len(labels) if isinstance(labels, (list, tuple)) else "not a list"
            raise InvalidPromptError(
                f"point_labels must have one list per object ({len(points)} objects), got {count}.",
                param="point_labels",
            )
    objects = []
    for i, obj in enumerate(points):
        if not isinstance(obj, (list, tuple)):
            raise InvalidPromptError(
                f"{_where(i)} must be a list of [x, y] points; the prompt nests objects → points → [x, y].",
                param="segment_prompt",
            )
        if not obj:
            raise InvalidPromptError(f"{_where(i)} has no points.", param="segment_prompt")
        if len(obj) > max_points:
            raise InvalidPromptError(
                f"{_where(i)} has {len(obj)} points; the limit is {max_points}.", param="segment_prompt"
            )
        obj_labels: Sequence[Any] = labels[i] if labels is not None else [INCLUDE] * len(obj)
        if not isinstance(obj_labels, (list, tuple)) or len(obj_labels) != len(obj):
            raise InvalidPromptError(
                f"{_where(i)} has {len(obj)} points but point_labels gives "
                f"{len(obj_labels) if isinstance(obj_labels, (list, tuple)) else 'no list'} for it.",
                param="point_labels",
            )
        coords, flags = [], []
        for j, point in enumerate(obj):
            if not isinstance(point, (list, tuple)) or len(point) != 2:
                got = f"{len(point)} values" if isinstance(point, (list, tuple)) else type(point).__name__
                hint = (
                    ""
                    if isinstance(point, (list, tuple))
                    else " (the prompt nests objects → points → [x, y], e.g. [[[120, 80]]])"
                )
                raise InvalidPromptError(f"{_where(i, j)} must be [x, y], got {got}{hint}.", param="segment_prompt")
            x, y = point
            if not (_is_number(x) and _is_number(y)):
                raise InvalidPromptError(
                    f"{_where(i, j)}: coordinates must be numbers, got {point!r}.", param="segment_prompt"
                )
            x, y = float(x), float(y)
            if not (math.isfinite(x) and math.isfinite(y)):
                raise InvalidPromptError(
                    f"{_where(i, j)}: coordinates must be finite, got {point!r}.", param="segment_prompt"
                )
            if not (0 <= x < width and 0 <= y < height):
                raise InvalidPromptError(
                    f"{_where(i, j)}: ({x:g}, {y:g}) is outside the {width}x{height} picture "
                    f"(x must be in [0, {width}), y in [0, {height})).",
                    param="segment_prompt",
                )
            label = obj_labels[j]
            if isinstance(label, bool) or not _is_number(label) or label not in (INCLUDE, EXCLUDE):
                hint = " (-1 is not 'exclude' in SAM: it means 'not a point'; use 0)" if label == -1 else ""
                raise InvalidPromptError(
                    f"{_where(i, j)}: label must be 1 (include) or 0 (exclude), got {label!r}{hint}.",
                    param="point_labels",
                )
            coords.append((x, y))
            flags.append(int(label))
        objects.append(ObjectPrompt(points=tuple(coords), labels=tuple(flags)))
    return Prompt(objects=tuple(objects))


def resized_shape(height: int, width: int, longest_edge: int = 1024) -> tuple[int, int]:
    """The (height, width) SAM's processor resizes a picture to (longest side = longest_edge)."""
    scale = longest_edge / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def padded_arrays(prompt: Prompt) -> tuple[np.ndarray, np.ndarray]:
    """Points (N, P, 2) and labels (N, P), shorter objects padded with PAD_LABEL, for one batched decode."""
    longest = max(len(obj.points) for obj in prompt.objects)
    points = np.zeros((len(prompt.objects), longest, 2), dtype=np.float64)
    labels = np.full((len(prompt.objects), longest), PAD_LABEL, dtype=np.int64)
    for i, obj in enumerate(prompt.objects):
        points[i, : len(obj.points)] = obj.points
        labels[i, : len(obj.labels)] = obj.labels
    return points, labels


def to_model_coordinates(
    points: np.ndarray, original_size: tuple[int, int], resized_size: tuple[int, int]
) -> np.ndarray:
    """Picture pixels → the resized frame the model sees. A pure function: per click, no image processing."""
    (old_h, old_w), (new_h, new_w) = original_size, resized_size
    scaled = np.array(points, dtype=np.float64, copy=True)
    scaled[..., 0] *= new_w / old_w
    scaled[..., 1] *= new_h / old_h
    return scaled
