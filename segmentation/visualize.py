"""Pictures for people: overlays, mask views, cut-outs, drawn points, candidate thumbnails, legend.

numpy and Pillow only; everything works on preview-sized arrays so a click stays cheap even
for a 40-megapixel picture.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

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


def color(value: int) -> tuple[int, int, int]:
    """The display colour of object `value` (1-based)."""
    return PALETTE[(value - 1) % len(PALETTE)]


def hex_color(value: int) -> str:
    red, green, blue = color(value)
    return f"#{red:02x}{green:02x}{blue:02x}"


def preview_size(width: int, height: int, max_side: int = 1024) -> tuple[int, int]:
    """(width, height) no larger than `max_side` on the longest side, aspect kept."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def resize_rgb(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    if rgb.shape[1] == width and rgb.shape[0] == height:
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((width, height), Image.Resampling.BILINEAR))


def _color_table(n: int) -> np.ndarray:
    table = np.zeros((max(n, 0) + 1, 3), dtype=np.uint8)
    for value in range(1, n + 1):
        table[value] = color(value)
    return table


def _edges(labels: np.ndarray) -> np.ndarray:
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    return edge & (labels > 0)


def overlay(rgb: np.ndarray, labels: np.ndarray, opacity: float = 0.5) -> np.ndarray:
    """The picture with every object tinted in its colour and outlined; background untouched."""
    n = int(labels.max(initial=0))
    colors = _color_table(n)[labels]
    inside = labels > 0
    out = rgb.astype(np.float32)
    out[inside] = out[inside] * (1.0 - opacity) + colors[inside].astype(np.float32) * opacity
    edges = _edges(labels)
    out[edges] = colors[edges]
    return out.round().astype(np.uint8)


def mask_view(labels: np.ndarray) -> np.ndarray:
    """The categorical mask alone: each object in its colour on a dark background."""
    view = _color_table(int(labels.max(initial=0)))[labels]
    view[labels == 0] = (24, 24, 27)
    return view


def cutout(rgb: np.ndarray, labels: np.ndarray, value: int | None = None) -> np.ndarray:
    """RGBA: the picture where objects are (or object `value`), transparent elsewhere."""
    keep = labels > 0 if value is None else labels == value
    alpha = np.where(keep, 255, 0).astype(np.uint8)
    return np.dstack([rgb, alpha])


def draw_points(
    rgb: np.ndarray,
    objects: Sequence[tuple[Sequence[Sequence[float]], Sequence[int]]],
    active: int | None = None,
    scale: float = 1.0,
) -> np.ndarray:
    """Points on the picture: include = filled dot, exclude = ring with a cross; object colours; active larger.

    `objects` holds (points, labels) in picture pixels; `scale` maps them to this array's pixels.
    """
    image = Image.fromarray(rgb).convert("RGB")
    draw = ImageDraw.Draw(image)
    base = max(4, round(max(image.size) / 110))
    for index, (points, labels) in enumerate(objects):
        fill = color(index + 1)
        radius = base + (2 if index == active else 0)
        for (x, y), label in zip(points, labels):
            cx, cy = (x + 0.5) * scale, (y + 0.5) * scale
            box = [cx - radius, cy - radius, cx + radius, cy + radius]
            if label == 1:
                draw.ellipse(box, fill=fill, outline=(255, 255, 255), width=max(2, radius // 3))
            else:
                draw.ellipse(box, fill=(20, 20, 20), outline=fill, width=max(2, radius // 3))
                arm = radius * 0.55
                width = max(2, radius // 3)
                draw.line([cx - arm, cy - arm, cx + arm, cy + arm], fill=(255, 255, 255), width=width)
                draw.line([cx - arm, cy + arm, cx + arm, cy - arm], fill=(255, 255, 255), width=width)
    return np.asarray(image)


def thumbnail(rgb: np.ndarray, labels: np.ndarray, value: int, max_side: int = 240) -> np.ndarray:
    """A small view of one object's mask over the picture, for choosing between candidates."""
    view = overlay(rgb, np.where(labels == value, value, 0).astype(labels.dtype), opacity=0.6)
    width, height = preview_size(view.shape[1], view.shape[0], max_side)
    return resize_rgb(view, width, height)


def legend_html(rows: Sequence[dict], active: int | None = None) -> str:
    """A table of objects: swatch, name, score, area, points, chosen candidate; the active one highlighted."""
    if not rows:
        return "<p class='legend-empty'>No objects yet: click on the picture to add a point.</p>"
    body = []
    for row in rows:
        value = row["value"]
        weight = "font-weight:700;" if value - 1 == active else ""
        score = "–" if row.get("score") is None else f"{row['score']:.3f}"
        area = "–" if row.get("area") is None else f"{row['area']:,} px ({row.get('percent', 0):.1f}%)"
        body.append(
            f"<tr style='{weight}'><td><span style='display:inline-block;width:14px;height:14px;border-radius:3px;"
            f"background:{hex_color(value)};vertical-align:middle'></span> {html.escape(str(row.get('name', f'Object {value}')))}"
            f"{' (active)' if value - 1 == active else ''}</td><td>{value}</td><td>{score}</td><td>{area}</td>"
            f"<td>{row.get('points', 0)}</td><td>{html.escape(str(row.get('candidate') or '–'))}</td></tr>"
        )
    return (
        "<table class='legend'><thead><tr><th>object</th><th>value</th><th>score</th><th>area</th><th>points</th>"
        "<th>candidate</th></tr>"
        "</thead><tbody>" + "".join(body) + "</tbody></table>"
    )
