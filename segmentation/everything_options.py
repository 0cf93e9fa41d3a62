"""The knobs of "segment everything", with official SAM-HQ's names and defaults, and their validation.

Named and defaulted as `SamAutomaticMaskGenerator` in SysCV/sam-hq: points_per_side 32, points_per_batch 64,
pred_iou_thresh 0.88, stability_score_thresh 0.95, stability_score_offset 1.0, box_nms_thresh 0.7,
min_mask_region_area 0 (when > 0, the kept masks' small holes and islands are cleaned up, `small_regions`).
Not offered (official's defaults run): crop layers (`crop_n_layers` 0: every mask comes from the one cached
embedding of the whole picture), hence no `crop_nms_thresh` either (its 0.7 is the clean-up's NMS floor).
No torch here: the schema imports it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from .errors import InvalidPromptError

MAX_POINTS_PER_SIDE = 64  # 4096 grid points: past official's 32×32 default, bounded by the work limit anyway
MAX_POINTS_PER_BATCH = 256
MAX_STABILITY_OFFSET = 100.0
# An area past every picture the server takes (SAMHQ_MAX_PIXELS' default): larger would mean nothing more.
MAX_MIN_MASK_REGION_AREA = 40_000_000
# Official's crop_nms_thresh (0.7): the clean-up's second NMS runs at max(box_nms_thresh, this).
CROP_NMS_THRESH = 0.7
PARAM = "segment_everything"  # the request field that carries these knobs


@dataclass(frozen=True)
class EverythingOptions:
    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    min_mask_region_area: int = 0

    @property
    def grid_points(self) -> int:
        return self.points_per_side**2

    @property
    def batches(self) -> int:
        return -(-self.grid_points // self.points_per_batch)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# name → (kind, low, high, low inclusive, high inclusive)
_RANGES: dict[str, tuple[type, float, float, bool, bool]] = {
    "points_per_side": (int, 1, MAX_POINTS_PER_SIDE, True, True),
    "points_per_batch": (int, 1, MAX_POINTS_PER_BATCH, True, True),
    "pred_iou_thresh": (float, 0.0, 1.0, True, True),
    "stability_score_thresh": (float, 0.0, 1.0, True, True),
    "stability_score_offset": (float, 0.0, MAX_STABILITY_OFFSET, False, True),
    "box_nms_thresh": (float, 0.0, 1.0, False, True),
    "min_mask_region_area": (int, 0, MAX_MIN_MASK_REGION_AREA, True, True),
}


_NOT_OFFERED = {
    "crop_n_layers",
    "crop_nms_thresh",
    "crop_overlap_ratio",
    "crop_n_points_downscale_factor",
    "point_grids",
    "output_mode",
}


def _fail(message: str, name: str | None = None) -> InvalidPromptError:
    return InvalidPromptError(message, param=f"{PARAM}.{name}" if name else PARAM, code="invalid_everything_option")


def _shown(raw: Any) -> str:
    """The value as the error message quotes it: at most 40 characters (a number may have thousands of digits)."""
    text = repr(raw)
    return text if len(text) <= 40 else text[:37] + "..."


def parse_everything(value: Any) -> EverythingOptions:
    """`segment_everything` as sent: `true` (the defaults) or an object of knobs; every knob checked for
    its type and range, unknown names refused (a typo must not silently run the defaults)."""
    if value is True:
        return EverythingOptions()
    if not isinstance(value, dict):
        raise _fail(
            f'{PARAM} must be true or an object of options such as {{"points_per_side": 16}}, '
            f"got {type(value).__name__}."
        )
    unknown = sorted(set(value) - set(_RANGES))
    if set(unknown) & _NOT_OFFERED:
        raise _fail(
            f"{PARAM}: {', '.join(sorted(set(unknown) & _NOT_OFFERED))} is not offered here: official's default "
            "runs (one crop, the whole picture; the built-in points grid; the answer's label map).",
            sorted(set(unknown) & _NOT_OFFERED)[0],
        )
    if unknown:
        raise _fail(f"{PARAM} has unknown option(s) {', '.join(map(repr, unknown))}; known: {', '.join(_RANGES)}.")
    checked: dict[str, Any] = {}
    for name, raw in value.items():
        kind, low, high, low_in, high_in = _RANGES[name]
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise _fail(f"{PARAM}.{name} must be a number, got {raw!r}.", name)
        if kind is int and (isinstance(raw, float) and not raw.is_integer()):
            raise _fail(f"{PARAM}.{name} must be a whole number, got {raw!r}.", name)
        try:
            number = float(raw)
        except OverflowError:  # a JSON integer past a float's range: out of every range below
            number = math.inf
        inside = (number >= low if low_in else number > low) and (number <= high if high_in else number < high)
        if not math.isfinite(number) or not inside:
            left, right = "[" if low_in else "(", "]" if high_in else ")"
            low_s, high_s = (f"{int(low)}", f"{int(high)}") if kind is int else (f"{low:g}", f"{high:g}")
            raise _fail(f"{PARAM}.{name} must be in {left}{low_s}, {high_s}{right}, got {_shown(raw)}.", name)
        checked[name] = int(number) if kind is int else number
    return EverythingOptions(**checked)
