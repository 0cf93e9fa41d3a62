"""Exports: per-object COCO RLE and polygons, the objects JSON document, ready-to-copy API snippets."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np


def rle_counts(mask: np.ndarray) -> list[int]:
    """COCO run lengths: column-major (Fortran) order, starting with a run of zeros."""
    flat = np.asarray(mask, dtype=bool).flatten(order="F")
    if flat.size == 0:
        return []
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(bounds).tolist()
    return ([0] + runs) if flat[0] else runs


def _counts_to_string(counts: Sequence[int]) -> str:
    """pycocotools' compressed RLE string (LEB128-like, 5 bits a character, deltas after the 3rd run)."""
    chars = []
    for i, count in enumerate(counts):
        x = int(count) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            chars.append(chr(c + 48))
    return "".join(chars)


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """A compressed COCO RLE ({"size": [h, w], "counts": str}), as pycocotools.mask.encode gives."""
    height, width = mask.shape
    return {"size": [int(height), int(width)], "counts": _counts_to_string(rle_counts(mask))}


# contourpy needs ~27 bytes a grid point (its float64 field, its cache, x and y): a 40-megapixel mask
# traced whole took ~1 GiB. Larger masks are traced in strips of about this many points and joined.
STRIP_POINTS = 2_000_000


def polygons(mask: np.ndarray, min_points: int = 3, strip_points: int = STRIP_POINTS) -> list[list[float]]:
    """Outlines of the mask as COCO polygons [x1, y1, x2, y2, ...] in pixel coordinates.

    Traced on the mask's bounding box only, and in strips of rows when that is large (the outlines
    are the same; a loop that crosses strips is joined back at the points the strips share)."""
    mask = np.asarray(mask, dtype=bool)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return []
    top, left = int(rows[0]), int(cols[0])
    crop = mask[top : int(rows[-1]) + 1, left : int(cols[-1]) + 1]
    lines = _trace(crop, strip_points)
    result = []
    for line in lines:
        if len(line) < min_points:
            continue
        coords = np.asarray(line, dtype=np.float64) + (left - 1.0, top - 1.0)  # undo the padding and the crop
        result.append([round(float(v), 2) for v in coords.reshape(-1)])
    return result


def _trace(crop: np.ndarray, strip_points: int) -> list[np.ndarray]:
    """contourpy's 0.5 lines of the crop padded with a ring of zeros (coordinates in the padded frame)."""
    from contourpy import contour_generator

    height, width = crop.shape
    rows = max(2, strip_points // (width + 2))
    if height + 2 <= rows:
        padded = np.zeros((height + 2, width + 2))
        padded[1:-1, 1:-1] = crop
        return list(contour_generator(z=padded, name="serial").lines(0.5))
    # strips of the padded frame sharing their edge rows: [0, rows), [rows - 1, 2 rows - 1), ...
    closed, pieces = [], []
    start = 0
    while start < height + 1:
        stop = min(height + 2, start + rows)
        z = np.zeros((stop - start, width + 2))
        inside = slice(max(start, 1), min(stop, height + 1))  # padded rows that hold crop rows
        z[inside.start - start : inside.stop - start, 1:-1] = crop[inside.start - 1 : inside.stop - 1]
        for line in contour_generator(z=z, name="serial").lines(0.5):
            line = line + (0.0, float(start))
            if len(line) > 1 and (line[0] == line[-1]).all():
                closed.append(line)
            else:
                pieces.append(line)
        start = stop - 1
    return closed + _join(pieces)


def _join(pieces: list[np.ndarray]) -> list[np.ndarray]:
    """Open pieces that end on a strip's edge, joined end to start into the loops they belong to."""
    by_start: dict[tuple[float, float], int] = {}
    by_end: dict[tuple[float, float], int] = {}
    for i, piece in enumerate(pieces):
        by_start[tuple(piece[0])] = i
        by_end[tuple(piece[-1])] = i
    used = [False] * len(pieces)
    loops = []
    for first in range(len(pieces)):
        if used[first]:
            continue
        used[first] = True
        parts, end = [pieces[first]], tuple(pieces[first][-1])
        while end != tuple(pieces[first][0]):
            following = by_start.get(end)
            if following is not None and not used[following]:
                piece = pieces[following]
            else:  # the neighbouring strip traced it the other way round
                following = next((j for j, p in enumerate(pieces) if not used[j] and tuple(p[-1]) == end), None)
                if following is None:
                    break  # cannot happen for a closed outline; keep what was traced
                piece = pieces[following][::-1]
            used[following] = True
            parts.append(piece[1:])
            end = tuple(piece[-1])
        loops.append(np.concatenate(parts))
    return loops


def objects_document(
    label_map: np.ndarray,
    objects: Sequence[Any],
    prompt: Sequence[dict[str, Any]],
    model: str,
) -> dict[str, Any]:
    """Per object: its prompt (points, labels, and its box prompt when it has one), score, area, bbox (of
    the mask), COCO RLE and polygons (values as in the label map)."""
    height, width = label_map.shape
    items = []
    for obj, spec in zip(objects, prompt):
        mask = label_map == obj.value
        items.append(
            {
                "value": obj.value,
                "points": spec["points"],
                "labels": spec["labels"],
                **({"box": spec["box"]} if spec.get("box") is not None else {}),
                "score": obj.score,
                "area": obj.area,
                "bbox": list(obj.bbox) if obj.bbox else None,
                "rle": rle_encode(mask),
                "polygons": polygons(mask),
            }
        )
    return {"model": model, "width": width, "height": height, "objects": items}


def _python(value: Any) -> str:
    """A JSON value written as a Python literal (None, True), for the snippets."""
    return json.dumps(value).replace("null", "None").replace("true", "True").replace("false", "False")


def _quoted(text: str) -> str:
    """`text` as a Python string literal (double quotes, escapes as JSON writes them): a model id, a URL or a
    file name that came from elsewhere (a remote server lists the model ids) is data in the snippet, never code."""
    return json.dumps(str(text), ensure_ascii=False)


def api_snippets(
    base_url: str,
    model: str,
    points: list,
    labels: list,
    image_name: str = "picture.jpg",
    *,
    hq_token_only: bool = False,
    candidate: int = 0,
    boxes: list | None = None,
) -> str:
    """Python for our client and for the AI Refinery SDK, with this prompt and every setting filled in.

    `candidate` is the ranked candidate every object takes (the API's i-th map): the call asks for
    `n = candidate + 1` maps and reads the last, so it reproduces exactly the map shown. `boxes`: one
    `[x0, y0, x1, y1]` or None per object (the API's `box_prompt`), or None when no object has a box.
    Every string (URL, model id, file name) is written quoted (`_quoted`), whatever it contains.
    """
    url, model_text, image_text = _quoted(base_url), _quoted(model), _quoted(image_name)
    prompt = json.dumps(points)
    point_labels = json.dumps(labels)
    options = ""
    if boxes is not None:
        options += f"\n        box_prompt={_python(boxes)},"
    if hq_token_only:
        options += "\n        hq_token_only=True,"
    if candidate:
        options += f"\n        n={candidate + 1},"
    sdk_extra = ""
    extra: dict[str, Any] = {}
    if boxes is not None:
        extra["box_prompt"] = boxes
    if hq_token_only:
        extra["hq_token_only"] = True
    if candidate:
        extra["n"] = candidate + 1
    if extra:
        sdk_extra = f"\n    extra_body={_python(extra)},"
    return f"""# Our client (pip install httpx pydantic numpy pillow; this repository's segmentation/client.py)
from segmentation.client import SegmentationClient

with SegmentationClient({url}) as client:   # api_key="..." if the server requires one
    response = client.images.segment(
        image={image_text},
        segment_prompt={prompt},
        point_labels={point_labels},
        model={model_text},{options}
    )
labels = response.data[{candidate}].to_array()   # H×W label map: 0 background, k = k-th object

# The AI Refinery SDK, unmodified (pip install airefinery-sdk; Python >= 3.12)
import base64
from air import AIRefinery

client = AIRefinery(api_key="YOUR_KEY", base_url={url})
with open({image_text}, "rb") as f:
    image = base64.b64encode(f.read()).decode()
response = client.images.segment(
    image=image,
    segment_prompt={prompt},
    model={model_text},
    point_labels={point_labels},{sdk_extra}
)
"""
