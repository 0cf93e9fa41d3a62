"""Segment everything (segmentation/everything.py) against an independent port of official SAM-HQ's
automatic mask generator (tests/official_amg.py), its low-resolution shortcut, its knobs, and its manners
(a click during a run is answered after at most one batch).

Seeded random weights give few masks past official's thresholds (the tiny checkpoint's predicted IoUs are
scaled by LOGIT_GAIN and its masks are speckles spanning the picture, so every box is about the whole
picture): the comparisons lower the thresholds on both sides alike, and one keeps official's NMS at 0.7.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import cv2
import numpy as np
import pytest
import torch
from conftest import make_picture
from official_amg import OfficialAutomaticMaskGenerator, mask_to_box, mask_to_rle, rle_to_mask
from official_amg import nms as official_nms
from official_amg import remove_small_regions as official_remove_small_regions
from official_reference import OfficialPredictor

from segmentation import decoder as dec
from segmentation.errors import InvalidPromptError
from segmentation.everything import (
    Cancelled,
    FoundMask,
    box_nms,
    compose_labels,
    generate,
    measure,
    point_grid,
    postprocess_small_regions,
    surely_unstable,
)
from segmentation.everything_options import EverythingOptions, parse_everything
from segmentation.small_regions import Region, clean_mask, components, remove_small_regions

MIN_IOU = 0.99


@pytest.fixture(scope="module")
def scene(segmenter):
    rgb = make_picture(240, 160, seed=3)
    reference = OfficialPredictor(segmenter.model, segmenter.loaded.processor)
    return rgb, segmenter.embed(rgb), reference


def _labels_of(result, embedding, k):
    if result.regions and result.regions[k] is not None:  # cleaned up: its new pixels
        return result.regions[k].to_mask(embedding.original_size)
    logits = dec.upscale_logits(result.logits[k : k + 1], embedding.resized_size, embedding.original_size)
    return logits[0].numpy() > 0


def _iou(a, b):
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


@pytest.mark.parametrize(
    "knobs",
    [
        dict(pred_iou_thresh=0.5, stability_score_thresh=0.05, box_nms_thresh=1.0),  # many masks, no NMS
        dict(pred_iou_thresh=0.0, stability_score_thresh=0.1, stability_score_offset=0.5, box_nms_thresh=0.7),
        dict(pred_iou_thresh=-2.0, stability_score_thresh=0.0, box_nms_thresh=0.9),
    ],
)
def test_the_masks_are_official_ones_same_set_same_order(knobs, segmenter, scene):
    rgb, embedding, reference = scene
    options = EverythingOptions(points_per_side=6, points_per_batch=10, **knobs)
    ours = generate(segmenter, embedding, options)
    official = OfficialAutomaticMaskGenerator(reference, points_per_side=6, points_per_batch=10, **knobs).generate(rgb)
    assert len(official) >= 1
    assert len(ours.masks) == len(official)
    for k, (mask, ref) in enumerate(zip(ours.masks, official)):
        assert list(mask.point) == pytest.approx(ref["point_coords"][0])
        assert mask.score == pytest.approx(ref["predicted_iou"], rel=1e-4, abs=1e-4)
        assert mask.stability == pytest.approx(ref["stability_score"], abs=1e-3)
        x0, y0, x1, y1 = mask.box
        assert [x0, y0, x1 - x0, y1 - y0] == ref["bbox"]
        assert mask.area == ref["area"]
        assert _iou(_labels_of(ours, embedding, k), ref["segmentation"]) >= MIN_IOU, f"mask {k + 1}"


def test_the_small_region_clean_up_is_officials(segmenter, scene):
    """min_mask_region_area > 0: holes filled, islands removed, changed masks last, new boxes and areas, as the
    independent port does it with OpenCV. Random weights make speckled masks: every one of them changes (the
    reordering and the second NMS's suppression: `test_the_clean_up_reorders_and_suppresses_as_official`)."""
    rgb, embedding, reference = scene
    knobs = dict(pred_iou_thresh=0.5, stability_score_thresh=0.05, box_nms_thresh=1.0, min_mask_region_area=20)
    options = EverythingOptions(points_per_side=6, points_per_batch=10, **knobs)
    ours = generate(segmenter, embedding, options)
    official = OfficialAutomaticMaskGenerator(reference, points_per_side=6, points_per_batch=10, **knobs).generate(rgb)
    assert len(ours.masks) == len(official) >= 2
    assert any(ref["changed"] for ref in official)
    edited = 0
    for k, (mask, ref) in enumerate(zip(ours.masks, official)):
        assert list(mask.point) == pytest.approx(ref["point_coords"][0])
        assert mask.score == pytest.approx(ref["predicted_iou"], rel=1e-4, abs=1e-4)
        assert mask.cleaned == ref["changed"] == (ours.regions[k] is not None)
        x0, y0, x1, y1 = mask.box
        assert [x0, y0, x1 - x0, y1 - y0] == ref["bbox"]
        assert mask.area == ref["area"]
        cleaned = _labels_of(ours, embedding, k)
        assert _iou(cleaned, ref["segmentation"]) >= MIN_IOU, f"mask {k + 1}"
        edited += int(np.count_nonzero(cleaned != _labels_of(replace(ours, regions=()), embedding, k)))  # its decode
    assert edited > 0  # the clean-up really changed pixels


# Picture-size masks equal to the signs of the 256×256 logits: a 256×256 "picture" whose resized size is 1024².
EXACT_SIZES = ((1024, 1024), (256, 256))


def _logits(inside: list[tuple[int, int, int, int]], outside=(), value: float = 5.0) -> torch.Tensor:
    """(256, 256) logits: `value` in the rectangles (y0, y1, x0, x1) of `inside`, -5 elsewhere and in `outside`."""
    logits = torch.full((256, 256), -5.0)
    for y0, y1, x0, x1 in inside:
        logits[y0:y1, x0:x1] = value
    for y0, y1, x0, x1 in outside:
        logits[y0:y1, x0:x1] = -5.0
    return logits


def _binary(low: torch.Tensor) -> np.ndarray:
    return (dec.upscale_logits(low, *EXACT_SIZES) > 0).numpy()


def test_the_clean_up_reorders_and_suppresses_as_official():
    """The second NMS on 0/1 scores: the untouched twin of a cleaned mask wins, unchanged masks come first."""
    square = (40, 120, 40, 120)
    low = torch.stack(
        [
            _logits([square, (200, 201, 200, 201)]),  # the square and a one-pixel island: changed
            _logits([square]),  # the same square alone: unchanged, and it suppresses the first
            _logits([(150, 230, 20, 100)], outside=[(180, 182, 50, 52)]),  # a 2×2 hole: changed, kept
            _logits([(10, 30, 150, 250)]),  # unchanged, kept
        ]
    )
    binary = _binary(low)
    assert np.array_equal(binary, low.numpy() > 0)
    stability, boxes, areas = measure(low, *EXACT_SIZES, 1.0)
    masks = tuple(
        FoundMask((float(k), 0.0), 0.9 - 0.1 * k, float(stability[k]), tuple(boxes[k].tolist()), int(areas[k]))
        for k in range(len(low))
    )
    options = EverythingOptions(box_nms_thresh=0.5, min_mask_region_area=10)  # second NMS at 0.7
    kept, logits, regions = postprocess_small_regions(masks, low, *EXACT_SIZES, options)

    official = OfficialAutomaticMaskGenerator(None, box_nms_thresh=0.5, min_mask_region_area=10)
    rles = [mask_to_rle(mask) for mask in binary]
    official_boxes = mask_to_box(torch.as_tensor(binary))
    keep, changed = official._postprocess_small_regions(rles, official_boxes)
    assert keep == [1, 3, 2] and changed == [True, False, True, False]
    assert [mask.point for mask in kept] == [masks[i].point for i in keep]
    torch.testing.assert_close(logits, low[keep])
    for mask, region, i in zip(kept, regions, keep):
        assert mask.cleaned == changed[i] == (region is not None)
        assert list(mask.box) == official_boxes[i].tolist()
        pixels = binary[i] if region is None else region.to_mask(EXACT_SIZES[1])
        assert np.array_equal(pixels, rle_to_mask(rles[i])) and mask.area == int(pixels.sum())
    assert regions[2].to_mask(EXACT_SIZES[1])[180:182, 50:52].all()  # the hole is filled


def test_the_label_map_honours_removed_islands_and_filled_holes():
    """A cleaned object never gets its removed island; its filled hole is its own where no other object's mask
    holds the pixel, and another object's where one does."""
    first = _logits([(40, 120, 40, 120), (200, 201, 200, 201)], outside=[(70, 74, 70, 74)])  # a 4×4 hole, an island
    second = _logits([(70, 72, 60, 80)], value=2.0)  # over the hole's top half, and over the first's square
    low = torch.stack([first, second])
    before = _binary(first[None])[0]
    cleaned, changed = clean_mask(before, 20)  # the hole has 16 pixels
    assert changed
    labels = compose_labels(low, (Region.of(cleaned), None), *EXACT_SIZES).numpy()
    plain = compose_labels(low, (None, None), *EXACT_SIZES).numpy()
    assert plain[200, 200] == 1 and labels[200, 200] == 0  # the island is nobody's now
    assert (plain[72:74, 70:74] == 0).all() and (labels[72:74, 70:74] == 1).all()  # the filled hole's free half
    assert (labels[70:72, 70:74] == 2).all()  # the other half: the second object's mask holds it
    assert (labels[70:72, 60:70] == 1).all() and (labels[70:72, 74:80] == 1).all()  # its higher logit wins there
    assert np.array_equal(labels == 1, cleaned & ~(labels == 2))
    untouched = cleaned == before
    assert np.array_equal(labels[untouched], plain[untouched])  # elsewhere, the map is as without a clean-up


def test_components_and_clean_up_agree_with_opencv_on_random_masks():
    rng = np.random.default_rng(7)
    for _ in range(60):
        height, width = (int(v) for v in rng.integers(1, 48, 2))
        mask = rng.random((height, width)) < rng.uniform(0.1, 0.9)
        count, regions, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), 8)
        found = components(mask)
        assert found.sizes.tolist() == stats[1:, -1].tolist()  # the same components, in OpenCV's order
        assert np.array_equal(regions[found.runs.row, found.runs.start], found.label + 1)
        for mode in ("holes", "islands"):
            for area in (2, 6, 40):
                ours, changed = remove_small_regions(mask, area, mode)
                official, official_changed = official_remove_small_regions(mask, area, mode)
                assert changed == official_changed and np.array_equal(ours, official)


def test_official_defaults_and_knob_names():
    options = EverythingOptions()
    assert options.as_dict() == {
        "points_per_side": 32,
        "points_per_batch": 64,
        "pred_iou_thresh": 0.88,
        "stability_score_thresh": 0.95,
        "stability_score_offset": 1.0,
        "box_nms_thresh": 0.7,
        "min_mask_region_area": 0,
    }
    assert parse_everything(True) == options
    assert parse_everything({"points_per_side": 16}).points_per_side == 16


@pytest.mark.parametrize(
    "value, param",
    [
        ({"points_per_side": 0}, "segment_everything.points_per_side"),
        ({"points_per_side": 65}, "segment_everything.points_per_side"),
        ({"points_per_side": 4.5}, "segment_everything.points_per_side"),
        ({"points_per_side": "16"}, "segment_everything.points_per_side"),
        ({"points_per_batch": True}, "segment_everything.points_per_batch"),
        ({"pred_iou_thresh": 1.5}, "segment_everything.pred_iou_thresh"),
        ({"stability_score_offset": 0}, "segment_everything.stability_score_offset"),
        ({"box_nms_thresh": 0}, "segment_everything.box_nms_thresh"),
        ({"points_per_sid": 16}, "segment_everything"),
        ({"min_mask_region_area": -1}, "segment_everything.min_mask_region_area"),
        ({"min_mask_region_area": 2.5}, "segment_everything.min_mask_region_area"),
        ({"min_mask_region_area": "100"}, "segment_everything.min_mask_region_area"),
        ({"min_mask_region_area": 40_000_001}, "segment_everything.min_mask_region_area"),
        ({"crop_nms_thresh": 0.5}, "segment_everything.crop_nms_thresh"),
        ("yes", "segment_everything"),
    ],
)
def test_bad_knobs_are_named(value, param):
    with pytest.raises(InvalidPromptError) as caught:
        parse_everything(value)
    assert caught.value.param == param


def test_low_resolution_shortcut_changes_nothing(segmenter, scene):
    """Masks whose 256×256 maximum is <= the offset are dropped before upscaling: bilinear upscaling never
    exceeds the low-resolution maximum (checked on random logits), and a run without the shortcut agrees."""
    _, embedding, _ = scene
    low = torch.randn(16, 256, 256) * 3
    upscaled = dec.upscale_logits(low, embedding.resized_size, embedding.original_size)
    assert bool((upscaled.flatten(1).amax(1) <= low.flatten(1).amax(1) + 1e-5).all())
    assert not bool(surely_unstable(low, 1.0).all())
    options = EverythingOptions(
        points_per_side=6, points_per_batch=12, pred_iou_thresh=0.0, stability_score_thresh=0.05
    )
    fast = generate(segmenter, embedding, options)
    exact = generate(segmenter, embedding, options, low_res_shortcut=False)
    assert fast.masks == exact.masks and len(fast.masks) > 0
    torch.testing.assert_close(fast.logits, exact.logits)
    # and the shortcut did drop masks here, so the comparison means something
    dropped = []
    generate(segmenter, embedding, EverythingOptions(points_per_side=6, points_per_batch=36, pred_iou_thresh=0.0,
                                                     stability_score_thresh=0.05, stability_score_offset=8.0),
             progress=lambda p: dropped.append(p.kept))  # fmt: skip
    assert dropped[-1] < 36


def test_nms_agrees_with_the_independent_one_on_random_boxes():
    rng = np.random.default_rng(0)
    for _ in range(20):
        corners = rng.integers(0, 60, size=(40, 2, 2))
        boxes = torch.as_tensor(np.concatenate([corners.min(1), corners.max(1)], axis=1))
        scores = torch.as_tensor(rng.random(40), dtype=torch.float32)
        for threshold in (0.3, 0.7):
            assert box_nms(boxes, scores, threshold).tolist() == official_nms(boxes, scores, threshold)


def test_point_grid_is_officials_cell_centres():
    grid = point_grid(2, 100, 50)
    assert grid.tolist() == [[25.0, 12.5], [75.0, 12.5], [25.0, 37.5], [75.0, 37.5]]


def test_progress_after_each_batch_and_cancel_between_batches(segmenter, scene):
    _, embedding, _ = scene
    options = EverythingOptions(points_per_side=4, points_per_batch=5, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    seen = []
    generate(segmenter, embedding, options, progress=seen.append)
    assert [p.done for p in seen] == [1, 2, 3, 4] and all(p.total == 4 for p in seen)
    seen.clear()
    with pytest.raises(Cancelled):
        generate(segmenter, embedding, options, progress=seen.append, cancelled=lambda: len(seen) >= 2)
    assert len(seen) == 2


def test_a_click_during_a_run_is_answered_after_at_most_one_batch(segmenter, scene):
    """A decode (any user's click) started while a run is going is answered before the run ends, and the
    run finishes at most one batch meanwhile: it starts no batch while a click is decoding."""
    _, embedding, _ = scene
    options = EverythingOptions(points_per_side=8, points_per_batch=8, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    batches: list[float] = []
    first = threading.Event()

    def progress(p):
        batches.append(time.perf_counter())
        first.set()

    run = threading.Thread(target=generate, args=(segmenter, embedding, options), kwargs={"progress": progress})
    run.start()
    assert first.wait(60)
    for _ in range(3):  # a few clicks, each during the run
        done_before = len(batches)
        if done_before >= options.batches - 1:
            break
        segmenter.segment(embedding, [[[30, 40]], [[120, 90], [60, 50]]])
        assert len(batches) - done_before <= 1
    run.join(120)
    assert len(batches) == options.batches
