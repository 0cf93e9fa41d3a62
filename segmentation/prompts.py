"""Prompts: validation with messages that name the culprit, and coordinate transforms.

A prompt is a list of objects; an object is a list of points `[x, y]` in the pixels of the
upright picture, each with a label (1 include, 0 exclude), and/or a box `[x0, y0, x1, y1]`.

SAM encodes each object as a sequence of sparse tokens, and the decoder attends over all of
them: objects decoded side by side must have the same token layout (`ObjectPrompt.layout`),
never padded to each other's length, or an object's mask depends on its neighbours.
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
    box: tuple[float, float, float, float] | None = None  # x0, y0, x1, y1 in picture pixels

    @property
    def ambiguous(self) -> bool:
        """One point alone could mean part, whole or group: SAM then proposes several candidates.
        A box is never ambiguous (official SAM-HQ decodes a box with the single-mask token)."""
        return len(self.points) == 1 and self.box is None

    @property
    def layout(self) -> tuple[int, bool]:
        """(points, has a box): objects with the same layout have the same sparse tokens and decode together."""
        return len(self.points), self.box is not None

    @property
    def tokens(self) -> int:
        """Prompt tokens it costs: one per point, two per box (its corners, as SAM encodes it)."""
        return len(self.points) + (2 if self.box is not None else 0)


@dataclass(frozen=True)
class Prompt:
    objects: tuple[ObjectPrompt, ...]

    @property
    def point_count(self) -> int:
        """Prompt tokens: points plus two per box (a box is encoded as its two corners). `usage.point_tokens`."""
        return sum(obj.tokens for obj in self.objects)

    def layout_groups(self) -> list[list[int]]:
        """Indexes of the objects, grouped by token layout in order of first appearance."""
        groups: dict[tuple[int, bool], list[int]] = {}
        for i, obj in enumerate(self.objects):
            groups.setdefault(obj.layout, []).append(i)
        return list(groups.values())

    def __len__(self) -> int:
        return len(self.objects)


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _as_float(value: Real) -> float:
    """float(value); an integer too large for a float (a 400-digit int) is not a coordinate either."""
    try:
        return float(value)
    except OverflowError:
        return math.inf


def _where(obj: int, point: int | None = None) -> str:
    return f"object {obj + 1}" + (f", point {point + 1}" if point is not None else "")


def _as_list(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray) else value


def parse_box(box: Any, obj: int, *, width: int, height: int) -> tuple[float, float, float, float] | None:
    """One object's box `[x0, y0, x1, y1]` (or None) in picture pixels: corners inside the picture
    (0 <= x <= width, 0 <= y <= height), x1 > x0 and y1 > y0."""
    box = _as_list(box)
    if box is None:
        return None
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        got = f"{len(box)} values" if isinstance(box, (list, tuple)) else type(box).__name__
        raise InvalidPromptError(
            f"{_where(obj)}: the box must be [x0, y0, x1, y1] or null, got {got}.", param="box_prompt"
        )
    if not all(_is_number(v) for v in box):
        raise InvalidPromptError(f"{_where(obj)}: box coordinates must be numbers, got {box!r}.", param="box_prompt")
    x0, y0, x1, y1 = (_as_float(v) for v in box)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise InvalidPromptError(f"{_where(obj)}: box coordinates must be finite, got {box!r}.", param="box_prompt")
    if x1 <= x0 or y1 <= y0:
        raise InvalidPromptError(
            f"{_where(obj)}: the box [{x0:g}, {y0:g}, {x1:g}, {y1:g}] is inverted or empty: "
            "it must be [x0, y0, x1, y1] with x1 > x0 and y1 > y0.",
            param="box_prompt",
        )
    if not (0 <= x0 and 0 <= y0 and x1 <= width and y1 <= height):
        raise InvalidPromptError(
            f"{_where(obj)}: the box [{x0:g}, {y0:g}, {x1:g}, {y1:g}] is outside the {width}x{height} picture "
            f"(x must be in [0, {width}], y in [0, {height}]).",
            param="box_prompt",
        )
    return x0, y0, x1, y1


def parse_prompt(
    points: Any,
    labels: Any = None,
    boxes: Any = None,
    *,
    width: int,
    height: int,
    max_objects: int = 255,
    max_points: int = 64,
) -> Prompt:
    """Validate nested lists `[[[x, y], ...], ...]` (labels of the same nesting, and `boxes`: None or
    one `[x0, y0, x1, y1]` or None per object) into a Prompt. An object with a box may have no points.

    Raises InvalidPromptError naming the offending object/point (1-based, as people count).
    """
    points = _as_list(points)
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
        labels = _as_list(labels)
        if not isinstance(labels, (list, tuple)) or len(labels) != len(points):
            count = len(labels) if isinstance(labels, (list, tuple)) else "not a list"
            raise InvalidPromptError(
                f"point_labels must have one list per object ({len(points)} objects), got {count}.",
                param="point_labels",
            )
    if boxes is not None:
        boxes = _as_list(boxes)
        if not isinstance(boxes, (list, tuple)) or len(boxes) != len(points):
            count = f"{len(boxes)} boxes" if isinstance(boxes, (list, tuple)) else "not a list"
            raise InvalidPromptError(
                f"box_prompt must have one box (or null) per object of segment_prompt ({len(points)} objects), "
                f"got {count}.",
                param="box_prompt",
            )
    objects = []
    for i, obj in enumerate(points):
        if not isinstance(obj, (list, tuple)):
            raise InvalidPromptError(
                f"{_where(i)} must be a list of [x, y] points; the prompt nests objects → points → [x, y].",
                param="segment_prompt",
            )
        box = parse_box(boxes[i], i, width=width, height=height) if boxes is not None else None
        if not obj and box is None:
            if boxes is None:
                raise InvalidPromptError(f"{_where(i)} has no points.", param="segment_prompt")
            raise InvalidPromptError(
                f"{_where(i)} has neither points nor a box: give it at least one point or a box.", param="box_prompt"
            )
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
            x, y = _as_float(x), _as_float(y)
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
        objects.append(ObjectPrompt(points=tuple(coords), labels=tuple(flags), box=box))
    return Prompt(objects=tuple(objects))


def resized_shape(height: int, width: int, longest_edge: int = 1024) -> tuple[int, int]:
    """The (height, width) SAM's processor resizes a picture to (longest side = longest_edge)."""
    scale = longest_edge / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def layout_arrays(objects: Sequence[ObjectPrompt]) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """Points (N, P, 2), labels (N, P) and boxes (N, 4) of objects that share one layout, for one
    batched decode: no padding between objects. Points are None for box-only objects, boxes None
    without boxes. (The prompt encoder adds official SAM's single "not a point" pad itself when
    there is no box.)"""
    layouts = {obj.layout for obj in objects}
    if len(layouts) != 1:
        raise ValueError(f"objects decoded together must share one layout, got {sorted(layouts)}")
    n_points, has_box = layouts.pop()
    points = labels = boxes = None
    if n_points:
        points = np.array([obj.points for obj in objects], dtype=np.float64).reshape(len(objects), n_points, 2)
        labels = np.array([obj.labels for obj in objects], dtype=np.int64).reshape(len(objects), n_points)
    if has_box:
        boxes = np.array([obj.box for obj in objects], dtype=np.float64).reshape(len(objects), 4)
    return points, labels, boxes


def model_frame_arrays(
    objects: Sequence[ObjectPrompt], original_size: tuple[int, int], resized_size: tuple[int, int]
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """`layout_arrays` with the points and the boxes' corners moved to the model's frame (`to_model_coordinates`):
    what a decoder call takes."""
    points, labels, boxes = layout_arrays(objects)
    if points is not None:
        points = to_model_coordinates(points, original_size, resized_size)
    if boxes is not None:
        boxes = to_model_coordinates(boxes.reshape(-1, 2, 2), original_size, resized_size).reshape(-1, 4)
    return points, labels, boxes


def to_model_coordinates(
    points: np.ndarray, original_size: tuple[int, int], resized_size: tuple[int, int]
) -> np.ndarray:
    """Picture pixels → the resized frame the model sees. A pure function: per click, no image processing."""
    (old_h, old_w), (new_h, new_w) = original_size, resized_size
    scaled = np.array(points, dtype=np.float64, copy=True)
    scaled[..., 0] *= new_w / old_w
    scaled[..., 1] *= new_h / old_h
    return scaled
