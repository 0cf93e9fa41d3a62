"""An independent re-implementation of official SAM-HQ's `SamAutomaticMaskGenerator` (one crop layer):
the reference the engine's "segment everything" (`segmentation/everything.py`) is tested against.

Written for these tests after SysCV/sam-hq's `segment_anything/automatic_mask_generator.py` and
`segment_anything/utils/amg.py` (Apache-2.0, Meta Platforms and the HQ-SAM team), following their steps
literally and at the picture's size, on the ported official predictor (`official_reference.OfficialPredictor`):

* `build_point_grid` → points × (width, height);
* per `points_per_batch`: the official prompt encoder and `MaskDecoderHQ.forward(multimask_output=True,
  hq_token_only)` (one mask per point), `Sam.postprocess_masks` to the picture's size (logits);
* predicted-IoU filter (> thresh), `calculate_stability_score` (int16/int32 sums), filter (>= thresh),
  masks > 0, `batched_mask_to_box`, uncompressed RLE of each mask;
* non-maximum suppression over the boxes (`batched_nms` with one category), best predicted IoU first;
* with `min_mask_region_area` > 0, `postprocess_small_regions`: each kept mask through `remove_small_regions`
  ("holes", then "islands") with OpenCV's `connectedComponentsWithStats` (8-connectivity), as official does,
  scores 0 (changed) / 1, boxes again, NMS at max(box_nms_thresh, crop_nms_thresh 0.7), new RLE and box for the
  changed masks kept (the engine labels components itself, `segmentation/small_regions.py`: not this code).

torchvision is not installed: the NMS here is a pairwise-IoU-matrix version of torchvision's greedy `nms`,
written independently of the engine's loop; RLE is written here too. Nothing of `segmentation` is used.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from official_reference import OfficialPredictor, apply_coords, postprocess_masks


def build_point_grid(n_per_side: int) -> np.ndarray:
    offset = 1 / (2 * n_per_side)
    one_side = np.linspace(offset, 1 - offset, n_per_side)
    xs = np.tile(one_side[None, :], (n_per_side, 1))
    ys = np.tile(one_side[:, None], (1, n_per_side))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def stability_score(masks: torch.Tensor, threshold: float, offset: float) -> torch.Tensor:
    intersections = (masks > (threshold + offset)).sum(-1, dtype=torch.int16).sum(-1, dtype=torch.int32)
    unions = (masks > (threshold - offset)).sum(-1, dtype=torch.int16).sum(-1, dtype=torch.int32)
    return intersections / unions


def mask_to_box(masks: torch.Tensor) -> torch.Tensor:
    """XYXY boxes (inclusive pixel indexes) of (N, H, W) bool masks; [0, 0, 0, 0] for an empty one."""
    boxes = torch.zeros((masks.shape[0], 4), dtype=torch.int64)
    for i, mask in enumerate(masks):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        if len(xs):
            boxes[i] = torch.stack([xs.min(), ys.min(), xs.max(), ys.max()])
    return boxes


def mask_to_rle(mask: np.ndarray) -> dict:
    """Uncompressed COCO RLE (column-major runs, starting with a run of zeros)."""
    flat = mask.T.ravel().astype(np.uint8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0, *runs]
    return {"size": list(mask.shape), "counts": runs}


def rle_to_mask(rle: dict) -> np.ndarray:
    h, w = rle["size"]
    values = np.zeros(h * w, dtype=bool)
    position, value = 0, False
    for run in rle["counts"]:
        values[position : position + run] = value
        position += run
        value = not value
    return values.reshape(w, h).T


def nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> list[int]:
    boxes = boxes.double()
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    top_left = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
    bottom_right = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=2)
    iou = inter / (area[:, None] + area[None, :] - inter)
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    keep: list[int] = []
    for i in order:
        if all(not bool(iou[k, i] > threshold) for k in keep):
            keep.append(i)
    return keep


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> tuple[np.ndarray, bool]:
    """Official `utils/amg.remove_small_regions`, step by step."""
    assert mode in ["holes", "islands"]
    correct_holes = mode == "holes"
    working_mask = (correct_holes ^ mask).astype(np.uint8)
    n_labels, regions, stats, _ = cv2.connectedComponentsWithStats(working_mask, 8)
    sizes = stats[:, -1][1:]  # row 0 is the background label
    small_regions = [i + 1 for i, s in enumerate(sizes) if s < area_thresh]
    if len(small_regions) == 0:
        return mask, False
    fill_labels = [0] + small_regions
    if not correct_holes:
        fill_labels = [i for i in range(n_labels) if i not in fill_labels]
        if len(fill_labels) == 0:  # every region is below the threshold: keep the largest
            fill_labels = [int(np.argmax(sizes)) + 1]
    return np.isin(regions, fill_labels), True


CROP_NMS_THRESH = 0.7  # official's default; one crop here, so it only matters to the small-region clean-up


class OfficialAutomaticMaskGenerator:
    def __init__(
        self,
        predictor: OfficialPredictor,
        points_per_side: int = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        min_mask_region_area: int = 0,
    ):
        self.predictor = predictor
        self.grid = build_point_grid(points_per_side)
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.min_mask_region_area = min_mask_region_area

    @torch.no_grad()
    def generate(self, rgb: np.ndarray, hq_token_only: bool = False) -> list[dict]:
        predictor = self.predictor
        predictor.set_image(rgb)
        height, width = rgb.shape[:2]
        points = self.grid * np.array([[width, height]])
        records: dict[str, list] = {"rles": [], "boxes": [], "iou_preds": [], "points": [], "stability": []}
        for first in range(0, len(points), self.points_per_batch):
            self._batch(points[first : first + self.points_per_batch], hq_token_only, records)
        if not records["rles"]:
            return []
        boxes = torch.cat(records["boxes"])
        scores = torch.cat(records["iou_preds"])
        keep = nms(boxes, scores, self.box_nms_thresh)
        stability = torch.cat(records["stability"])
        all_points = np.concatenate(records["points"])
        rles = [records["rles"][i] for i in keep]
        boxes, scores, stability, all_points = boxes[keep], scores[keep], stability[keep], all_points[keep]
        changed = [False] * len(keep)
        if self.min_mask_region_area > 0:
            keep, changed = self._postprocess_small_regions(rles, boxes)
            rles = [rles[i] for i in keep]
            boxes, scores, stability, all_points = boxes[keep], scores[keep], stability[keep], all_points[keep]
            changed = [changed[i] for i in keep]
        out = []
        for i in range(len(rles)):
            x0, y0, x1, y1 = boxes[i].tolist()
            rle = rles[i]
            out.append(
                {
                    "segmentation": rle_to_mask(rle),
                    "area": int(sum(rle["counts"][1::2])),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "predicted_iou": float(scores[i]),
                    "point_coords": [all_points[i].tolist()],
                    "stability_score": float(stability[i]),
                    "changed": changed[i],
                }
            )
        return out

    def _postprocess_small_regions(self, rles: list[dict], boxes: torch.Tensor) -> tuple[list[int], list[bool]]:
        """Official `postprocess_small_regions`: edits `rles` and `boxes` in place for the changed masks the second
        NMS keeps; returns (kept indexes in order, changed flags)."""
        new_masks, scores = [], []
        for rle in rles:
            mask = rle_to_mask(rle)
            mask, changed = remove_small_regions(mask, self.min_mask_region_area, mode="holes")
            unchanged = not changed
            mask, changed = remove_small_regions(mask, self.min_mask_region_area, mode="islands")
            unchanged = unchanged and not changed
            new_masks.append(torch.as_tensor(mask).unsqueeze(0))
            scores.append(float(unchanged))  # score 0 for changed masks: NMS prefers the untouched ones
        masks = torch.cat(new_masks, dim=0)
        new_boxes = mask_to_box(masks)
        keep = nms(new_boxes.float(), torch.as_tensor(scores), max(self.box_nms_thresh, CROP_NMS_THRESH))
        for i in keep:
            if scores[i] == 0.0:
                rles[i] = mask_to_rle(masks[i].numpy())
                boxes[i] = new_boxes[i]
        return keep, [score == 0.0 for score in scores]

    def _batch(self, points: np.ndarray, hq_token_only: bool, records: dict) -> None:
        predictor = self.predictor
        model = predictor.model
        coords = torch.as_tensor(apply_coords(points, predictor.original_size, model.img_size), dtype=torch.float)
        labels = torch.ones(coords.shape[0], dtype=torch.int)
        sparse, dense = model.prompt_encoder(points=(coords[:, None, :], labels[:, None]), boxes=None, masks=None)
        image_pe = model.prompt_encoder.get_dense_pe()
        if model.hq:
            low_res, iou = model.mask_decoder(
                predictor.features, image_pe, sparse, dense, True, hq_token_only, predictor.interm_features
            )
        else:  # plain SAM's generator keeps all three masks of a point; not what these tests ask of it
            raise NotImplementedError("the SAM-HQ generator is ported; plain SAM's keeps three masks per point")
        masks = postprocess_masks(low_res, predictor.input_size, predictor.original_size, model.img_size)
        masks, iou = masks[:, 0], iou[:, 0]  # one mask per point
        point_list = torch.as_tensor(points)
        if self.pred_iou_thresh > 0.0:
            keep = iou > self.pred_iou_thresh
            masks, iou, point_list = masks[keep], iou[keep], point_list[keep]
        stability = stability_score(masks, 0.0, self.stability_score_offset)
        if self.stability_score_thresh > 0.0:
            keep = stability >= self.stability_score_thresh
            masks, iou, point_list, stability = masks[keep], iou[keep], point_list[keep], stability[keep]
        binary = masks > 0.0
        records["boxes"].append(mask_to_box(binary))
        records["iou_preds"].append(iou)
        records["points"].append(point_list.numpy())
        records["stability"].append(stability)
        records["rles"].extend(mask_to_rle(m) for m in binary.numpy())
