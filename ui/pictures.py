"""The page's few server-side picture helpers: the object palette (the browser draws with it), the
preview picture, and the full-size cut-out download. numpy and Pillow only."""

from __future__ import annotations

from typing import BinaryIO

import numpy as np
from PIL import Image

# Distinct, colour-blind-friendly hues (Okabe-Ito, then Tableau); object k uses PALETTE[(k - 1) % len].
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 159, 0),
    (86, 180, 233),
    (0, 158, 115),
    (240, 228, 66),
    (0, 114, 178),
    (213, 94, 0),
    (204, 121, 167),
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (188, 189, 34),
    (23, 190, 207),
)


def hex_color(value: int) -> str:
    """The display colour of object `value` (1-based), as the browser's palette lists it."""
    red, green, blue = PALETTE[(value - 1) % len(PALETTE)]
    return f"#{red:02x}{green:02x}{blue:02x}"


def preview_size(width: int, height: int, max_side: int = 1024) -> tuple[int, int]:
    """(width, height) no larger than `max_side` on the longest side, aspect kept."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def resize_rgb(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    if rgb.shape[1] == width and rgb.shape[0] == height:
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((width, height), Image.Resampling.BILINEAR))


def cutout(rgb: np.ndarray, labels: np.ndarray, value: int | None = None) -> np.ndarray:
    """RGBA: the picture where objects are (or object `value`), transparent elsewhere."""
    keep = labels > 0 if value is None else labels == value
    alpha = np.where(keep, 255, 0).astype(np.uint8)
    return np.dstack([rgb, alpha])


def write_cutout_png(rgb: Image.Image, labels: Image.Image, out: BinaryIO) -> None:
    """The cut-out as PNG into `out`, built in place: the decoded picture takes the objects as its alpha
    (Pillow keeps RGB at 4 bytes a pixel, so RGBA costs no copy) and the encoder streams its rows out.
    A 40-megapixel cut-out costs the picture plus two 8-bit planes, not float or int64 copies."""
    alpha = labels.point(lambda v: 255 if v > 0 else 0)
    rgb.putalpha(alpha)
    del alpha
    rgb.save(out, format="PNG", compress_level=3)
