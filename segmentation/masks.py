"""Label maps: composing them from logits, measuring them, and turning them into files.

A label map is one integer image of the picture's size: 0 background, k the k-th object.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .decoder import upscale_logits

# Upscaled logits are float32 at the picture's size; bound how many are alive at once.
_MAX_UPSCALED_VALUES = 48_000_000


@dataclass(frozen=True)
class ObjectStats:
    value: int  # the object's value in the label map (1-based prompt order)
    area: int  # pixels carrying that value
    bbox: tuple[int, int, int, int] | None  # x0, y0, x1, y1 (inclusive), None when the object got no pixel


def label_dtype(n_objects: int) -> np.dtype:
    return np.dtype(np.uint8) if n_objects <= 255 else np.dtype(np.uint16)


@torch.inference_mode()
def compose_label_map(
    low_res_logits: torch.Tensor, resized_size: tuple[int, int], original_size: tuple[int, int]
) -> torch.Tensor:
    """(N, 256, 256) logits → (H, W) int32 label map on the same device.

    A pixel belongs to an object where its upscaled logit is > 0; where several claim it,
    the highest logit wins (ties: the earlier object).
    """
    n = low_res_logits.shape[0]
    height, width = original_size
    device = low_res_logits.device
    best = torch.zeros((height, width), dtype=torch.float32, device=device)  # > 0 only where claimed
    labels = torch.zeros((height, width), dtype=torch.int32, device=device)
    chunk = max(1, _MAX_UPSCALED_VALUES // max(1, height * width))
    for start in range(0, n, chunk):
        logits = upscale_logits(low_res_logits[start : start + chunk], resized_size, original_size)
        chunk_best, chunk_index = logits.max(dim=0)
        wins = chunk_best > best
        best = torch.where(wins, chunk_best, best)
        labels = torch.where(wins, chunk_index.to(torch.int32) + (start + 1), labels)
    return labels


@torch.inference_mode()
def object_stats(labels: torch.Tensor, n_objects: int) -> list[ObjectStats]:
    """Area and bounding box of each object value 1..n in one pass over the label map."""
    height, width = labels.shape
    flat = labels.flatten().long()
    areas = torch.bincount(flat, minlength=n_objects + 1)
    rows = torch.arange(height, device=labels.device).repeat_interleave(width)
    cols = torch.arange(width, device=labels.device).repeat(height)
    size = n_objects + 1
    x0 = torch.full((size,), width, device=labels.device).scatter_reduce(0, flat, cols, "amin")
    x1 = torch.full((size,), -1, device=labels.device).scatter_reduce(0, flat, cols, "amax")
    y0 = torch.full((size,), height, device=labels.device).scatter_reduce(0, flat, rows, "amin")
    y1 = torch.full((size,), -1, device=labels.device).scatter_reduce(0, flat, rows, "amax")
    table = torch.stack([areas[:size], x0, y0, x1, y1], dim=1).cpu().tolist()
    stats = []
    for value in range(1, size):
        area, bx0, by0, bx1, by1 = table[value]
        stats.append(ObjectStats(value, int(area), (bx0, by0, bx1, by1) if area else None))
    return stats


def to_numpy_labels(labels: torch.Tensor, n_objects: int) -> np.ndarray:
    """Only the small integer map crosses to the host: uint8 up to 255 objects, uint16 beyond."""
    small = labels.to(torch.uint8 if n_objects <= 255 else torch.int32)
    return small.cpu().numpy().astype(label_dtype(n_objects), copy=False)


def encode_png(label_map: np.ndarray) -> bytes:
    """A lossless single-channel PNG (8-bit, or 16-bit beyond 255 objects) of the label map."""
    if label_map.dtype == np.uint8:
        image = Image.fromarray(label_map, "L")
    elif label_map.dtype == np.uint16:
        image = Image.fromarray(label_map.astype("<u2"), "I;16")
    else:
        raise ValueError(f"label maps are uint8 or uint16, got {label_map.dtype}")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


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
