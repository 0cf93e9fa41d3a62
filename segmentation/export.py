"""Exports: per-object COCO RLE and polygons, the objects JSON document, ready-to-copy API snippets."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


def rle_counts(mask: np.ndarray) -> list[int]:
    """COCO run lengths: column-major (Fortran) order, starting with a run of zeros."""
    mask = np.asarray(mask, dtype=bool)
    if mask.size == 0:
        return []
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return [int(mask.size)]
    top, left = int(rows[0]), int(cols[0])
    crop = mask[top : int(rows[-1]) + 1, left : int(cols[-1]) + 1]
    return crop_rle_counts(crop, top, left, mask.shape)


def crop_rle_counts(crop: np.ndarray, top: int, left: int, size: tuple[int, int]) -> list[int]:
    """COCO run lengths of a mask of `size` (h, w) that is zero outside `crop`, placed at (top, left).

    Only the crop is read: an object's runs cost its bounding box, not the picture (a 20-object
    3-megapixel picture's RLEs take a fraction of one full-size pass per object; docs/PERFORMANCE.md)."""
    height, width = size
    total = height * width
    columns = np.zeros((crop.shape[1], crop.shape[0] + 2), dtype=np.int8)  # one row per column, padded
    columns[:, 1:-1] = np.asarray(crop, dtype=bool).T
    steps = np.diff(columns, axis=1)  # +1 where a run of ones starts, -1 just past where it ends
    col, row = np.nonzero(steps)
    index = (col.astype(np.int64) + left) * height + row + top  # column-major index in the whole mask
    rising = steps[col, row] > 0
    starts, ends = index[rising], index[~rising]
    if starts.size == 0:
        return [total]
    joined = ends[:-1] == starts[1:]  # a run that ends a column and goes on at the top of the next
    starts = starts[np.concatenate([[True], ~joined])]
    ends = ends[np.concatenate([~joined, [True]])]
    bounds = np.empty(2 * starts.size + 2, dtype=np.int64)
    bounds[0], bounds[1:-1:2], bounds[2:-1:2], bounds[-1] = 0, starts, ends, total
    counts = np.diff(bounds).tolist()
    return counts[:-1] if counts[-1] == 0 else counts


def _counts_to_string(counts: Sequence[int] | np.ndarray) -> str:
    """pycocotools' compressed RLE string (LEB128-like, 5 bits a character, deltas after the 3rd run).

    Vectorised: every count's characters are worked out at once, so a mask of a million runs (noise,
    a fine texture) costs milliseconds, not a Python loop over each run."""
    values = np.asarray(counts, dtype=np.int64)
    if values.size == 0:
        return ""
    rest = values.copy()
    rest[3:] -= values[1:-2]  # pycocotools writes x - counts[i - 2] from the 4th count on
    chars = np.zeros((values.size, 8), dtype=np.uint8)  # 8 groups of 5 bits hold any int64 delta of a count
    length = np.zeros(values.size, dtype=np.int64)
    going = np.ones(values.size, dtype=bool)
    for k in range(chars.shape[1]):
        group = rest & 0x1F
        rest >>= 5  # arithmetic shift, as pycocotools' (negative deltas end on -1)
        more = np.where(group & 0x10 != 0, rest != -1, rest != 0)
        chars[:, k] = group + 48 + 32 * more
        length += going
        going &= more
        if not going.any():
            break
    kept = np.arange(chars.shape[1]) < length[:, None]
    return chars[kept].tobytes().decode("ascii")


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """A compressed COCO RLE ({"size": [h, w], "counts": str}), as pycocotools.mask.encode gives."""
    height, width = mask.shape
    return {"size": [int(height), int(width)], "counts": _counts_to_string(rle_counts(mask))}


def crop_rle_encode(crop: np.ndarray, top: int, left: int, size: tuple[int, int]) -> dict[str, Any]:
    """rle_encode of the mask of `size` that is `crop` at (top, left) and zero elsewhere."""
    return {"size": [int(size[0]), int(size[1])], "counts": _counts_to_string(crop_rle_counts(crop, top, left, size))}


@dataclass(frozen=True)
class Region:
    """Where one value lies in a label map: its pixel count, bounding box (x0, y0, x1, y1 inclusive) and COCO RLE."""

    value: int
    area: int
    bbox: tuple[int, int, int, int]
    rle: dict[str, Any]


# label_map_regions reads the map in bands of whole columns of about this many pixels (its transposed copy
# and change flags are 2-3 bytes a pixel of the band, not of the picture).
REGION_BAND_PIXELS = 4_000_000


def label_map_regions(label_map: np.ndarray, band_pixels: int = REGION_BAND_PIXELS) -> dict[int, Region]:
    """Every non-zero value of a label map with its area, box and COCO RLE, from one pass over the map.

    COCO RLE runs go down the columns; so do the map's own runs of equal values. One pass finds where
    the value changes down each column, and each object's RLE is its runs in that order (a run that
    ends a column and goes on at the top of the next is one RLE run). This costs one pass whatever the
    number of objects, where encoding a mask per object (as pycocotools does) costs one pass each
    (benchmarks/rle_bench.py)."""
    height, width = label_map.shape
    total = height * width
    if total == 0:
        return {}
    columns_per_band = max(1, band_pixels // height)
    starts_parts, values_parts = [], []
    for left in range(0, width, columns_per_band):
        columns = np.ascontiguousarray(label_map[:, left : left + columns_per_band].T)  # (band, h)
        change = np.empty(columns.shape, dtype=bool)
        change[:, 0] = True  # every column starts a run: runs never cross bands or columns here
        np.not_equal(columns[:, 1:], columns[:, :-1], out=change[:, 1:])
        flat = np.flatnonzero(change)
        values = columns.reshape(-1)[flat]
        starts_parts.append(flat.astype(np.int64) + left * height)  # column-major index in the picture
        values_parts.append(values)
    starts = np.concatenate(starts_parts)
    values = np.concatenate(values_parts)
    ends = np.append(starts[1:], total)
    kept = values != 0
    starts, ends, values = starts[kept], ends[kept], values[kept]
    order = np.argsort(values, kind="stable")  # each value's runs stay in column-major order
    starts, ends, values = starts[order], ends[order], values[order]
    bounds = np.flatnonzero(np.diff(values)) + 1
    regions = {}
    for first, stop in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [values.size]])):
        if first == stop:
            continue
        s, e = starts[first:stop], ends[first:stop]
        value = int(values[first])
        cols, rows, last_rows = s // height, s % height, (e - 1) % height
        bbox = (int(cols[0]), int(rows.min()), int(cols[-1]), int(last_rows.max()))
        joined = e[:-1] == s[1:]
        run_starts = s[np.concatenate([[True], ~joined])]
        run_ends = e[np.concatenate([~joined, [True]])]
        edges = np.empty(2 * run_starts.size + 2, dtype=np.int64)
        edges[0], edges[1:-1:2], edges[2:-1:2], edges[-1] = 0, run_starts, run_ends, total
        counts = np.diff(edges)
        if counts[-1] == 0:
            counts = counts[:-1]
        rle = {"size": [int(height), int(width)], "counts": _counts_to_string(counts)}
        regions[value] = Region(value, int((e - s).sum()), bbox, rle)
    return regions


# contourpy needs ~27 bytes a grid point (its float64 field, its cache, x and y): a 40-megapixel mask
# traced whole took ~1 GiB. Larger masks are traced in strips of about this many points and joined.
STRIP_POINTS = 2_000_000


def polygons(
    mask: np.ndarray,
    min_points: int = 3,
    strip_points: int = STRIP_POINTS,
    *,
    origin: tuple[int, int] = (0, 0),
) -> list[list[float]]:
    """Outlines of the mask as COCO polygons [x1, y1, x2, y2, ...], one per ring (parts and holes).

    Coordinates are COCO's: pixel (x, y) covers [x, x + 1) x [y, y + 1), so an outline runs through the
    middle of the edges between the object's boundary pixels and the background (pycocotools rasterises
    a hole-free part back to exactly its pixels). Rings are closed implicitly (the first point is not
    repeated) and keep only their corners: points on a straight run, the 45-degree steps of a staircase
    included, are dropped (the outline is the same). `origin` (x, y) is where the mask sits in the
    picture, for a mask cut to an object's box."""
    return [
        ring.reshape(-1).tolist()  # corners lie on the half-pixel grid: exact floats, nothing to round
        for ring in rings(mask, strip_points, origin=origin)
        if len(ring) >= min_points
    ]


def rings(mask: np.ndarray, strip_points: int = STRIP_POINTS, *, origin: tuple[int, int] = (0, 0)) -> list[np.ndarray]:
    """The mask's outlines as (n, 2) float arrays of (x, y) corners in COCO's frame (see `polygons`).

    Traced on the mask's bounding box only, and in strips of rows when that is large (the outlines
    are the same; a loop that crosses strips is joined back at the points the strips share)."""
    mask = np.asarray(mask, dtype=bool)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return []
    top, left = int(rows[0]), int(cols[0])
    crop = mask[top : int(rows[-1]) + 1, left : int(cols[-1]) + 1]
    shift = (left + origin[0] - 0.5, top + origin[1] - 0.5)  # undo the padding and the crop; pixel centres at +0.5
    return [ring + shift for ring in _corners(_trace(crop, strip_points))]


def _corners(lines: list[np.ndarray]) -> list[np.ndarray]:
    """Closed lines as their corners: no repeated last point, no repeated point, no point on a straight run;
    rings left with fewer than 3 corners go. All lines at once: a speckled mask has 100 000 of them."""
    lengths = np.array([len(line) for line in lines], dtype=np.int64)
    if not lengths.any():
        return []
    points = np.concatenate(lines).astype(np.float64, copy=False)
    lengths = lengths[lengths > 0]
    starts = _starts(lengths)
    ends = starts + lengths - 1
    keep = np.ones(len(points), dtype=bool)
    keep[ends[(lengths > 1) & (points[starts] == points[ends]).all(axis=1)]] = False  # the closing repeat
    points, lengths = _kept(points, lengths, keep)
    before = points - _neighbours(points, lengths, -1)
    points, lengths = _kept(points, lengths, (before != 0).any(axis=1))
    before = points - _neighbours(points, lengths, -1)
    after = _neighbours(points, lengths, 1) - points
    turns = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0] != 0  # exact: points on the half-pixel grid
    points, lengths = _kept(points, lengths, turns)
    return [ring for ring in np.split(points, np.cumsum(lengths)[:-1]) if len(ring) >= 3]


def _starts(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)


def _neighbours(points: np.ndarray, lengths: np.ndarray, step: int) -> np.ndarray:
    """Each point's neighbour `step` along its own ring (rings are closed: the last one's next is the first)."""
    starts = _starts(lengths)
    ring = np.repeat(np.arange(len(lengths)), lengths)
    place = np.arange(len(points)) - starts[ring]
    return points[starts[ring] + (place + step) % lengths[ring]]


def _kept(points: np.ndarray, lengths: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The points kept, and the rings' new lengths (rings left empty go)."""
    if not len(lengths):
        return points, lengths
    counts = np.add.reduceat(keep.astype(np.int64), _starts(lengths))
    return points[keep], counts[counts > 0]


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
