"""Segment everything: official SAM-HQ's automatic mask generator, on the picture's cached embedding.

As `SamAutomaticMaskGenerator.generate` in SysCV/sam-hq (one crop, the whole picture): a grid of
`points_per_side`² points, decoded `points_per_batch` at a time as one-point prompts. SAM-HQ keeps ONE
mask per point: the multimask token with the best predicted IoU plus the HQ token's mask (or the HQ mask
alone with `hq_token_only`), which is exactly our one-point object's first candidate (`decoder.rank_candidates`).
Each batch keeps masks whose predicted IoU is > `pred_iou_thresh` and whose stability score (IoU of the
mask thresholded at ±`stability_score_offset`) is >= `stability_score_thresh`; box non-maximum suppression
at `box_nms_thresh` over the boxes of the masks then drops duplicates, best predicted IoU first.

What runs where, and why the answer is official's to the pixel:

* The predicted-IoU filter runs on the two-way transformer's IoU token, before any mask is made: the masks
  (the decoder's expensive part, the upscaling and SAM-HQ's per-object mask features) are computed only for
  the points past it.
* A low-resolution test drops, without upscaling, the masks whose stability score is surely 0: the
  picture-size logits are bilinear interpolations (convex combinations) of the 256×256 ones, so none
  exceeds the low-resolution maximum; when that maximum is <= the offset, no pixel passes the upper
  threshold (the intersection is 0) and the mask fails any positive stability threshold.
  `tests/test_everything.py` checks the bound and that the result equals a run without the shortcut.
* The survivors are upscaled to the picture's size a few at a time (bounded memory, as `masks`) for their
  stability score and box, exactly as official computes them (int32 counts, float32 ratio); only their
  low-resolution logits are kept. The answer's label map is composed from those like any other request's.

With `min_mask_region_area` > 0, official's `postprocess_small_regions` follows the NMS: each kept mask, at the
picture's size, gets its holes smaller than the area filled, then its islands smaller than it removed
(8-connectivity, the largest kept when all are small; `small_regions`). Masks that changed score 0, the others 1,
boxes are measured again and a second NMS at max(box_nms_thresh, 0.7) (official's crop_nms_thresh) runs on
those scores: unchanged masks first, each group in its order. A changed mask keeps its new pixels as a compact
`Region` (its box, one bit a pixel); `compose_labels` makes the answer's label map from the logits and those
regions: a removed island is never that object's pixel, a filled hole is unless another object claims it.

Between batches the generator waits while a click's decode is running (`Segmenter.wait_for_quiet`), and
`batch_context` (the service's admission gate) is taken per batch, not per run: another user's click waits
for at most one batch. `progress` is called after each batch; `cancelled` is read before each.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from . import decoder as dec
from .engine import MAX_DECODE_BATCH
from .everything_options import CROP_NMS_THRESH, EverythingOptions
from .masks import compose_label_map
from .prompts import to_model_coordinates
from .small_regions import Region, clean_mask

# At most this many picture-size float32 logits exist at once while measuring the survivors (64 MB).
_MAX_UPSCALED_VALUES = 16_000_000
# The clean-up of small regions works on at most this many picture-size masks between two yields to clicks.
_CLEANUP_CHUNK = 4
# How long a batch waits for running clicks to finish before it goes anyway (no starvation under a stream of clicks).
MAX_YIELD_SECONDS = 5.0


@dataclass(frozen=True)
class FoundMask:
    """One mask the generator kept, in official's terms."""

    point: tuple[float, float]  # the grid point that produced it, picture pixels
    score: float  # predicted IoU
    stability: float  # stability score
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 of the picture-size mask, inclusive ([0, 0, 0, 0] when empty)
    area: int  # pixels of the picture-size mask (before the label map resolves overlaps)
    cleaned: bool = False  # the small-region clean-up changed it (official's score 0 in its second NMS)


@dataclass(frozen=True)
class Progress:
    done: int  # batches finished
    total: int  # batches in the run
    kept: int  # masks past the filters so far (before non-maximum suppression)


@dataclass(frozen=True)
class EverythingResult:
    masks: tuple[FoundMask, ...]  # official's order: best predicted IoU first (after a clean-up: unchanged first)
    logits: torch.Tensor  # (K, 256, 256) low-resolution logits of the masks, same order, on the host
    grid_points: int
    batches: int
    cancelled: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    # per mask, its pixels when the small-region clean-up changed it (None: its logits > 0); () without a clean-up
    regions: tuple[Region | None, ...] = ()


class Cancelled(Exception):
    """The run was cancelled between two batches."""


def point_grid(points_per_side: int, width: int, height: int) -> np.ndarray:
    """(n², 2) points [x, y] in picture pixels, evenly spaced cell centres, x fastest (official's order)."""
    offset = 1 / (2 * points_per_side)
    side = np.linspace(offset, 1 - offset, points_per_side)
    xs = np.tile(side[None, :], (points_per_side, 1))
    ys = np.tile(side[:, None], (1, points_per_side))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2) * np.array([width, height], dtype=np.float64)


def surely_unstable(low_res: torch.Tensor, offset: float) -> torch.Tensor:
    """(N,) bool: masks whose picture-size logits cannot exceed `offset` anywhere (stability score 0),
    decided at low resolution: bilinear upscaling never exceeds the input's maximum."""
    return low_res.flatten(1).amax(dim=1) <= offset


def measure(
    low_res: torch.Tensor, resized_size: tuple[int, int], original_size: tuple[int, int], offset: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(stability (N,) float32, boxes (N, 4) int64 inclusive, areas (N,) int64) of the picture-size masks,
    upscaled a few at a time."""
    height, width = original_size
    if low_res.shape[0] == 0:
        device = low_res.device
        return (
            torch.empty(0, device=device),
            torch.empty((0, 4), dtype=torch.int64, device=device),
            torch.empty(0, dtype=torch.int64, device=device),
        )
    chunk = max(1, _MAX_UPSCALED_VALUES // max(1, height * width))
    stability, boxes, areas = [], [], []
    rows = torch.arange(height, device=low_res.device)
    cols = torch.arange(width, device=low_res.device)
    for start in range(0, low_res.shape[0], chunk):
        logits = dec.upscale_logits(low_res[start : start + chunk], resized_size, original_size)
        inter = (logits > offset).sum(dim=(1, 2)).to(torch.int32)
        union = (logits > -offset).sum(dim=(1, 2)).to(torch.int32)
        stability.append(inter / union)
        masks = logits > 0
        del logits
        areas.append(masks.sum(dim=(1, 2)))
        in_row, in_col = masks.any(dim=2), masks.any(dim=1)  # (n, H), (n, W)
        bottom = (in_row * rows).amax(dim=1)
        top = torch.where(in_row, rows, height).amin(dim=1)
        right = (in_col * cols).amax(dim=1)
        left = torch.where(in_col, cols, width).amin(dim=1)
        box = torch.stack([left, top, right, bottom], dim=1)
        empty = (right < left) | (bottom < top)
        boxes.append(torch.where(empty[:, None], torch.zeros_like(box), box))
        del masks
    return torch.cat(stability), torch.cat(boxes), torch.cat(areas)


def box_nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression (torchvision's `nms` semantics: areas (x1-x0)·(y1-y0), a box is dropped
    when its IoU with a kept better one is > threshold). Indexes kept, best score first."""
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64)
    boxes = boxes.double()
    order = torch.sort(scores, descending=True, stable=True).indices
    x0, y0, x1, y1 = boxes.unbind(1)
    areas = (x1 - x0) * (y1 - y0)
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    keep = []
    for rank, i in enumerate(order.tolist()):
        if suppressed[i]:
            continue
        keep.append(i)
        rest = order[rank + 1 :]
        width = (torch.minimum(x1[i], x1[rest]) - torch.maximum(x0[i], x0[rest])).clamp_min(0)
        height = (torch.minimum(y1[i], y1[rest]) - torch.maximum(y0[i], y0[rest])).clamp_min(0)
        inter = width * height
        iou = inter / (areas[i] + areas[rest] - inter)
        suppressed[rest[iou > threshold]] = True
    return torch.as_tensor(keep, dtype=torch.int64)


def _decode_batch(
    segmenter, embedding, batch: np.ndarray, options: EverythingOptions, hq_token_only: bool
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """(logits (K, 256, 256), predicted IoUs (K,), indexes into `batch`) of the points whose predicted IoU passes,
    each point a one-point prompt keeping SAM-HQ's one mask. The IoUs come from the two-way transformer alone,
    so masks (the expensive part) are made only for the points past the filter; MAX_DECODE_BATCH points go
    through the decoder at a time, which bounds memory whatever `points_per_batch` (results do not depend on it)."""
    model, device, dtype = segmenter.model, segmenter.device, segmenter.dtype
    all_logits, all_scores, all_rows = [], [], []
    for first in range(0, len(batch), MAX_DECODE_BATCH):
        chunk = batch[first : first + MAX_DECODE_BATCH]
        coords = to_model_coordinates(chunk[:, None, :], embedding.original_size, embedding.resized_size)
        coords_t = torch.as_tensor(coords, dtype=dtype, device=device)
        labels_t = torch.ones((len(chunk), 1), dtype=torch.int64, device=device)
        sparse = dec.sparse_tokens(model, coords_t, labels_t)
        queries, keys = dec.decode_tokens(model, embedding.features, segmenter._positions, sparse)
        best_iou = dec.predicted_iou(model, queries)[:, 1:4].amax(dim=1).float()  # the score of SAM-HQ's pick
        keep = torch.ones(len(chunk), dtype=torch.bool, device=device)
        if options.pred_iou_thresh > 0.0:
            keep &= best_iou > options.pred_iou_thresh
        rows = keep.nonzero().flatten()
        if len(rows):
            output = dec.decode_masks(model, embedding.features, queries[:, rows], keys[rows])
            ambiguous = torch.ones(len(rows), dtype=torch.bool, device=device)
            ranked = dec.rank_candidates(output, ambiguous, hq_token_only=hq_token_only)
            all_logits.append(ranked.logits[:, 0].float())
            all_scores.append(ranked.scores[:, 0].float())
            all_rows.append(rows.cpu().numpy() + first)
            del output, ranked
        del queries, keys
    if not all_rows:
        return torch.empty((0, 256, 256), device=device), torch.empty(0, device=device), np.empty(0, dtype=np.int64)
    return torch.cat(all_logits), torch.cat(all_scores), np.concatenate(all_rows)


def generate(
    segmenter,
    embedding,
    options: EverythingOptions,
    *,
    hq_token_only: bool = False,
    batch_context: Callable[[], AbstractContextManager] | None = None,
    progress: Callable[[Progress], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
    low_res_shortcut: bool = True,
) -> EverythingResult:
    """Every object of the picture of `embedding`, as official SAM-HQ's automatic mask generator finds it.

    Raises `Cancelled` when `cancelled()` turns true before a batch (or a step of the small-region clean-up). `low_res_shortcut=False` upscales every
    mask past the IoU filter (for the test that proves the shortcut changes nothing)."""
    segmenter._check_model(embedding)
    start = time.perf_counter()
    device = segmenter.device
    hq_token_only = bool(hq_token_only and segmenter.hq)
    points = point_grid(options.points_per_side, embedding.width, embedding.height)
    total = options.batches

    def turn() -> contextlib.ExitStack:
        """One step of the run: cancelled? then clicks first, then the caller's gate, the OOM guard, no autograd."""
        if cancelled is not None and cancelled():
            raise Cancelled()
        waited = time.perf_counter()
        segmenter.wait_for_quiet(MAX_YIELD_SECONDS)
        timings["waited"] += time.perf_counter() - waited
        stack = contextlib.ExitStack()
        stack.enter_context(batch_context() if batch_context is not None else contextlib.nullcontext())
        stack.enter_context(segmenter._out_of_memory_guard("segmenting everything"))
        stack.enter_context(torch.inference_mode())
        return stack

    kept_logits, kept_scores, kept_stability, kept_boxes, kept_areas, kept_points = [], [], [], [], [], []
    offset = options.stability_score_offset
    timings = {"decoder": 0.0, "measure": 0.0, "waited": 0.0}
    for index in range(total):
        with turn():
            batch = points[index * options.points_per_batch : (index + 1) * options.points_per_batch]
            tick = time.perf_counter()
            logits, scores, rows = _decode_batch(segmenter, embedding, batch, options, hq_token_only)
            batch = batch[rows]
            tock = time.perf_counter()
            timings["decoder"] += tock - tick
            keep = torch.ones(len(batch), dtype=torch.bool, device=device)
            if low_res_shortcut and options.stability_score_thresh > 0.0:
                keep &= ~surely_unstable(logits, offset)
            index_kept = keep.nonzero().flatten()
            logits, scores = logits[index_kept], scores[index_kept]
            batch_points = batch[index_kept.cpu().numpy()]
            stability, boxes, areas = measure(logits, embedding.resized_size, embedding.original_size, offset)
            if options.stability_score_thresh > 0.0:
                stable = (stability >= options.stability_score_thresh).nonzero().flatten()
                logits, scores, stability = logits[stable], scores[stable], stability[stable]
                boxes, areas, batch_points = boxes[stable], areas[stable], batch_points[stable.cpu().numpy()]
            kept_logits.append(logits.cpu())
            kept_scores.append(scores.cpu())
            kept_stability.append(stability.cpu())
            kept_boxes.append(boxes.cpu())
            kept_areas.append(areas.cpu())
            kept_points.append(batch_points)
            timings["measure"] += time.perf_counter() - tock
        if progress is not None:
            progress(Progress(done=index + 1, total=total, kept=sum(len(s) for s in kept_scores)))
    scores = torch.cat(kept_scores) if kept_scores else torch.empty(0)
    boxes = torch.cat(kept_boxes) if kept_boxes else torch.empty((0, 4), dtype=torch.int64)
    order = box_nms(boxes, scores, options.box_nms_thresh)
    logits = torch.cat(kept_logits)[order] if kept_logits else torch.empty((0, 256, 256))
    stability = torch.cat(kept_stability)[order] if kept_stability else torch.empty(0)
    areas = torch.cat(kept_areas)[order] if kept_areas else torch.empty(0, dtype=torch.int64)
    grid = np.concatenate(kept_points)[order.numpy()] if kept_points else np.empty((0, 2))
    masks = tuple(
        FoundMask(
            point=(float(grid[k, 0]), float(grid[k, 1])),
            score=float(scores[i]),
            stability=float(stability[k]),
            box=tuple(int(v) for v in boxes[i].tolist()),
            area=int(areas[k]),
        )
        for k, i in enumerate(order.tolist())
    )
    regions: tuple[Region | None, ...] = ()
    if options.min_mask_region_area > 0 and masks:
        tick = time.perf_counter()
        masks, logits, regions = postprocess_small_regions(
            masks, logits, embedding.resized_size, embedding.original_size, options, turn
        )
        timings["small_regions"] = time.perf_counter() - tick
    timings["everything"] = time.perf_counter() - start
    return EverythingResult(masks, logits, options.grid_points, total, timings=timings, regions=regions)


def clean_up(
    low_res: torch.Tensor,
    resized_size: tuple[int, int],
    original_size: tuple[int, int],
    min_area: int,
    turn: Callable[[], AbstractContextManager] = contextlib.nullcontext,
) -> list[Region | None]:
    """Per mask (K, 256, 256), its picture-size pixels after official's clean-up (holes, then islands, smaller
    than `min_area`) when that changed it, else None. A few masks at a time, each few inside `turn()`."""
    height, width = original_size
    chunk = max(1, min(_CLEANUP_CHUNK, _MAX_UPSCALED_VALUES // max(1, height * width)))
    regions: list[Region | None] = []
    for first in range(0, low_res.shape[0], chunk):
        with turn():
            masks = (dec.upscale_logits(low_res[first : first + chunk], resized_size, original_size) > 0).cpu()
            for mask in masks.numpy():
                cleaned, changed = clean_mask(mask, min_area)
                regions.append(Region.of(cleaned) if changed else None)
            del masks
    return regions


def postprocess_small_regions(
    masks: tuple[FoundMask, ...],
    logits: torch.Tensor,
    resized_size: tuple[int, int],
    original_size: tuple[int, int],
    options: EverythingOptions,
    turn: Callable[[], AbstractContextManager] = contextlib.nullcontext,
) -> tuple[tuple[FoundMask, ...], torch.Tensor, tuple[Region | None, ...]]:
    """Official's `postprocess_small_regions` on the masks kept by the NMS: (masks, logits, regions) in its new
    order. Changed masks score 0 and the others 1 in a second NMS at max(box_nms_thresh, crop_nms_thresh)
    over the boxes measured again (unchanged masks first, each group in its order; the sort is stable, as
    torchvision's); a changed mask takes its new box and area."""
    regions = clean_up(logits, resized_size, original_size, options.min_mask_region_area, turn)
    boxes = torch.as_tensor(
        [mask.box if region is None else region.box() for mask, region in zip(masks, regions)], dtype=torch.int64
    )
    unchanged = torch.as_tensor([float(region is None) for region in regions])
    keep = box_nms(boxes, unchanged, max(options.box_nms_thresh, CROP_NMS_THRESH)).tolist()
    kept = tuple(
        masks[i]
        if regions[i] is None
        else replace(masks[i], box=regions[i].box(), area=regions[i].area(), cleaned=True)
        for i in keep
    )
    return kept, logits[keep], tuple(regions[i] for i in keep)


def compose_labels(
    low_res: torch.Tensor,
    regions: tuple[Region | None, ...],
    resized_size: tuple[int, int],
    original_size: tuple[int, int],
) -> torch.Tensor:
    """(H, W) label map (uint8, int32 past 255 objects) of the masks found, on `low_res`'s device.

    Without clean-up edits, `masks.compose_label_map`: a pixel goes to the object with the highest logit
    among those whose logit is > 0 there (ties: the earlier one). With them, an object claims a pixel with its
    logit where its logit is > 0 (unchanged mask) or where its cleaned region holds the pixel (changed mask):
    a removed island is not claimed at all, and a filled hole is claimed with its logit, <= 0, so it loses to
    any object whose own mask holds the pixel and goes to the highest-logit hole among several. One running
    maximum, upscaled a few masks at a time: memory does not grow with the masks."""
    if not any(region is not None for region in regions):
        return compose_label_map(low_res, resized_size, original_size)
    height, width = original_size
    count = low_res.shape[0]
    dtype = torch.uint8 if count <= 255 else torch.int32
    chunk = max(1, _MAX_UPSCALED_VALUES // max(1, height * width))
    with torch.inference_mode():
        labels = torch.zeros((height, width), dtype=dtype, device=low_res.device)
        best = torch.full((height, width), -torch.inf, device=low_res.device)
        for first in range(0, count, chunk):
            claims = dec.upscale_logits(low_res[first : first + chunk], resized_size, original_size)
            for j, claim in enumerate(claims):
                region = regions[first + j]
                if region is None:
                    claim.masked_fill_(claim <= 0, -torch.inf)
                else:
                    inside = torch.zeros((height, width), dtype=torch.bool, device=claim.device)
                    window = torch.from_numpy(region.window()).to(claim.device)
                    inside[region.top : region.top + region.height, region.left : region.left + region.width] = window
                    claim.masked_fill_(~inside, -torch.inf)
                    del inside, window
            if claims.shape[0] == 1:  # large pictures: one mask at a time, no index map
                chunk_best, values = claims[0], torch.tensor(first + 1, dtype=dtype, device=labels.device)
            else:
                chunk_best, index = claims.max(dim=0)  # ties: the first index
                values = (index + (first + 1)).to(dtype)
                del index
            wins = chunk_best > best  # strictly: on a tie the earlier object keeps the pixel; -inf claims nothing
            labels = torch.where(wins, values, labels)
            torch.maximum(best, chunk_best, out=best)
            del claims, chunk_best, values, wins
    return labels
