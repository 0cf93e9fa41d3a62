"""Label maps: composing them from logits, measuring them, and turning them into files.

A label map is one integer image of the picture's size: 0 background, k the k-th object.
torch is imported only where maps are composed from logits: measuring, encoding and resizing maps is
numpy, so the page in front of a remote model server uses this module without torch installed.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

# Memory per request is bounded, not proportional to the objects: at most this many upscaled
# float32 logits are alive at once (64 MB), besides the running best logit and the label map.
_MAX_UPSCALED_VALUES = 16_000_000
# Areas and boxes: comparing the map once per object is fastest for a few objects (~0.2 ms each
# at 1.5 megapixels); beyond this many, one pass that tabulates every value wins.
_SCAN_PER_VALUE_UP_TO = 12
# The tabulating pass works in bands of rows of at most this many pixels: its int64 temporaries
# (8 bytes a pixel) never cover the whole map.
_BAND_PIXELS = 4_000_000


@dataclass(frozen=True)
class ObjectStats:
    value: int  # the object's value in the label map (1-based prompt order)
    area: int  # pixels carrying that value
    bbox: tuple[int, int, int, int] | None  # x0, y0, x1, y1 (inclusive), None when the object got no pixel


def label_dtype(n_objects: int) -> np.dtype:
    return np.dtype(np.uint8) if n_objects <= 255 else np.dtype(np.uint16)


def _device_label_dtype(n_objects: int) -> torch.dtype:
    """The label map's dtype on the model's device (torch has no general uint16: int32 there)."""
    import torch

    return torch.uint8 if n_objects <= 255 else torch.int32


def compose_label_map(
    low_res_logits: torch.Tensor, resized_size: tuple[int, int], original_size: tuple[int, int]
) -> torch.Tensor:
    """See `_compose_label_map`; in inference mode."""
    import torch

    with torch.inference_mode():
        return _compose_label_map(low_res_logits, resized_size, original_size)


def _compose_label_map(
    low_res_logits: torch.Tensor, resized_size: tuple[int, int], original_size: tuple[int, int]
) -> torch.Tensor:
    """(N, 256, 256) logits → (H, W) label map on the same device: uint8 up to 255 objects, else int32.

    A pixel belongs to an object where its upscaled logit is > 0; where several claim it,
    the highest logit wins (ties: the earlier object). A running maximum over the objects, in
    order, updated in place: at most `_MAX_UPSCALED_VALUES` upscaled logits exist at once (one
    object at a time on a large picture), so the peak does not grow with the number of objects:
    about 10 bytes a pixel at 40 megapixels (~400 MB).
    """
    import torch

    from .decoder import upscale_logits

    n = low_res_logits.shape[0]
    height, width = original_size
    dtype = _device_label_dtype(n)
    labels = best = wins = None
    chunk = max(1, _MAX_UPSCALED_VALUES // max(1, height * width))
    for start in range(0, n, chunk):
        logits = upscale_logits(low_res_logits[start : start + chunk], resized_size, original_size)
        if logits.shape[0] == 1:  # large pictures: one object at a time, no index map
            chunk_best, values = logits[0], start + 1
        else:  # small pictures: the chunk's maximum at once (its int64 index map is small here)
            chunk_best, index = logits.max(dim=0)  # ties: the first index
            values = (index + (start + 1)).to(dtype)
            del index
        del logits
        if labels is None:  # nothing claimed yet: a pixel is claimed where its logit is > 0
            wins = chunk_best > 0
            labels = _claim(wins, values, torch.zeros((height, width), dtype=dtype, device=wins.device))
            if start + chunk < n:
                best = chunk_best.clamp_min(0)
        else:
            torch.gt(chunk_best, best, out=wins)  # strictly: on a tie the earlier object keeps the pixel
            labels = _claim(wins, values, labels)
            torch.maximum(best, chunk_best, out=best)
        del chunk_best, values
    return labels


# An object's upscaled logits where it can claim pixels: (top, left, logits) of the smallest window holding
# every pixel whose logit is > 0 (outside it the object claims nothing), or None when it claims nothing.
Window: TypeAlias = "tuple[int, int, torch.Tensor] | None"


def positive_window(upscaled: torch.Tensor) -> Window:
    """The part of an object's (H, W) upscaled logits that can matter to a label map (see `Window`)."""
    import torch

    with torch.inference_mode():
        positive = upscaled > 0
        rows = torch.nonzero(positive.any(dim=1)).flatten()
        if rows.numel() == 0:
            return None
        cols = torch.nonzero(positive.any(dim=0)).flatten()
        top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        return top, left, upscaled[top:bottom, left:right].clone()


def compose_upscaled(windows: Iterable[Window], n_objects: int, size: tuple[int, int]) -> torch.Tensor:
    """The label map `compose_label_map` gives, from each object's upscaled logits (`positive_window`, in
    prompt order): > 0 claims a pixel, the highest logit wins, ties go to the earlier object. A caller that
    keeps each object's window composes a map in a few passes over each object's window only; `windows` may
    be a generator, so no more than one object's upscaled logits need exist besides the running best."""
    import torch

    labels = best = None
    with torch.inference_mode():
        for value, window in enumerate(windows, start=1):
            if window is None:
                continue
            top, left, logits = window
            if labels is None:
                labels = torch.zeros(size, dtype=_device_label_dtype(n_objects), device=logits.device)
                best = torch.zeros(size, dtype=logits.dtype, device=logits.device)
            height, width = logits.shape
            region = best[top : top + height, left : left + width]
            wins = logits > region  # strictly, and the best is never below 0: an earlier object keeps a tie
            labels[top : top + height, left : left + width].masked_fill_(wins, value)
            region.copy_(torch.maximum(region, logits))
    if labels is None:
        return torch.zeros(size, dtype=_device_label_dtype(n_objects))
    return labels


def _claim(wins: torch.Tensor, values: torch.Tensor | int, labels: torch.Tensor) -> torch.Tensor:
    """`labels` with `values` where `wins`: in place for one object's value, else a new map."""
    import torch

    if isinstance(values, int):
        return labels.masked_fill_(wins, values)
    return torch.where(wins, values, labels)


def object_stats(labels: np.ndarray, n_objects: int) -> list[ObjectStats]:
    """Area and bounding box of each object value 1..n of a label map."""
    if n_objects <= _SCAN_PER_VALUE_UP_TO:  # one comparison of the map per object
        stats = []
        for value in range(1, n_objects + 1):
            pixels = labels == value
            area = int(np.count_nonzero(pixels))
            stats.append(ObjectStats(value, area, _bbox(pixels.any(axis=1), pixels.any(axis=0)) if area else None))
        return stats
    height, width = labels.shape
    values = n_objects + 1
    areas = np.zeros(values, dtype=np.int64)
    rows_with = np.zeros((values, height), dtype=bool)  # which values occur in each row
    cols_with = np.zeros((values, width), dtype=bool)  # ... and in each column
    band = max(1, _BAND_PIXELS // max(1, width))
    for top in range(0, height, band):
        rows = labels[top : top + band]
        areas += np.bincount(rows.ravel(), minlength=values)[:values]
        rows_with[:, top : top + band] = _occurrence_table(rows, n_objects, axis=1)
        cols_with |= _occurrence_table(rows, n_objects, axis=0)
    return [
        ObjectStats(value, int(areas[value]), _bbox(rows_with[value], cols_with[value]) if areas[value] else None)
        for value in range(1, n_objects + 1)
    ]


def _bbox(rows_with: np.ndarray, cols_with: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(rows_with), np.flatnonzero(cols_with)
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def _occurrence_table(labels: np.ndarray, n_objects: int, axis: int) -> np.ndarray:
    """(n+1, lines) bool: whether value v occurs in line i (rows for axis=1, columns for axis=0)."""
    values = n_objects + 1
    lines = labels.shape[1 - axis]
    line_index = np.arange(lines, dtype=np.int64)
    line_index = line_index[:, None] if axis == 1 else line_index[None, :]
    counts = np.bincount((labels + values * line_index).ravel(), minlength=values * lines)
    return counts.reshape(lines, values).T > 0


def to_numpy_labels(labels: torch.Tensor, n_objects: int) -> np.ndarray:
    """Only the small integer map crosses to the host: uint8 up to 255 objects, uint16 beyond."""
    small = labels.to(_device_label_dtype(n_objects))
    return small.cpu().numpy().astype(label_dtype(n_objects), copy=False)


def encode_png(label_map: np.ndarray) -> bytes:
    """A lossless single-channel PNG (8-bit, or 16-bit beyond 255 objects) of the label map.

    Written here rather than by Pillow: a label map is long runs of a few values, so rows
    left unfiltered and zlib's run-length strategy compress about as well as Pillow's
    per-row adaptive filters, in half the time or less (docs/PERFORMANCE.md).
    """
    if label_map.dtype == np.uint8:
        bit_depth, samples = 8, label_map
    elif label_map.dtype == np.uint16:
        bit_depth, samples = 16, label_map.astype(">u2")  # PNG stores 16-bit samples big-endian
    else:
        raise ValueError(f"label maps are uint8 or uint16, got {label_map.dtype}")
    if label_map.ndim != 2 or 0 in label_map.shape:
        raise ValueError(f"a label map is a non-empty 2-D array, got shape {label_map.shape}")
    height, width = label_map.shape
    scanlines = np.zeros((height, 1 + width * samples.itemsize), dtype=np.uint8)  # byte 0: filter type None
    scanlines[:, 1:] = np.ascontiguousarray(samples).view(np.uint8).reshape(height, -1)
    compressor = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    pixels = compressor.compress(scanlines) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)  # grayscale, no interlace
    return _PNG_SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", pixels) + _png_chunk(b"IEND", b"")


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def encode_bit_png(height: int, width: int, crop: np.ndarray, top: int = 0, left: int = 0) -> bytes:
    """A 1-bit grayscale PNG of a height x width mask that is `crop` (bool) at (top, left), 0 elsewhere.

    One bit a pixel: an object's full-size mask costs an eighth of an 8-bit one to compress, and only
    the crop's rows are built (Pillow reads it as mode "1", OpenCV as 0/255)."""
    row_bytes = (width + 7) // 8
    scanlines = np.zeros((height, 1 + row_bytes), dtype=np.uint8)  # byte 0: filter type None
    if crop.size:
        band = np.zeros((crop.shape[0], width), dtype=bool)
        band[:, left : left + crop.shape[1]] = crop
        scanlines[top : top + crop.shape[0], 1:] = np.packbits(band, axis=1)
    compressor = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    pixels = compressor.compress(scanlines) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return _PNG_SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", pixels) + _png_chunk(b"IEND", b"")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def decode_png(data: bytes) -> np.ndarray:
    """The label map back from `encode_png`'s bytes, with its original dtype."""
    image = Image.open(io.BytesIO(data))
    if image.mode == "L":
        return np.asarray(image, dtype=np.uint8)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        return np.asarray(image).astype(np.uint16)
    raise ValueError(f"not a label-map PNG (mode {image.mode})")


def resize_nearest(label_map: np.ndarray, width: int, height: int) -> np.ndarray:
    """Nearest-neighbour resize: every output value is one of the input values (categorical)."""
    src_h, src_w = label_map.shape
    rows = np.minimum(((np.arange(height) + 0.5) * src_h / height).astype(np.int64), src_h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * src_w / width).astype(np.int64), src_w - 1)
    return label_map[rows[:, None], cols[None, :]]


def parse_size(size: str) -> tuple[int, int]:
    """'WIDTHxHEIGHT' → (width, height); raises ValueError with the expected form."""
    try:
        width_text, height_text = size.lower().replace(" ", "").split("x")
        width, height = int(width_text), int(height_text)
    except (AttributeError, ValueError) as error:
        raise ValueError(f"size must look like 'WIDTHxHEIGHT', e.g. '512x512'; got {size!r}") from error
    if not (1 <= width <= 16384 and 1 <= height <= 16384):
        raise ValueError(f"size {size!r} is out of range: width and height must be 1 to 16384")
    return width, height
