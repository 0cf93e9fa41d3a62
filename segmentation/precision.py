"""Deciding whether reduced precision is safe: compare its masks with float32 on a test picture."""

from __future__ import annotations

import numpy as np


def test_picture(size: int = 512, seed: int = 0) -> np.ndarray:
    """A deterministic picture with distinct shapes on a textured background."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    picture = (rng.random((size, size, 3)) * 40 + 100).astype(np.float64)
    picture[(x - size * 0.3) ** 2 + (y - size * 0.35) ** 2 < (size * 0.15) ** 2] = (220, 40, 40)
    picture[(abs(x - size * 0.7) < size * 0.12) & (abs(y - size * 0.65) < size * 0.18)] = (30, 60, 210)
    return picture.clip(0, 255).astype(np.uint8)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def masks_agree(reference, candidate, min_iou: float = 0.98) -> tuple[bool, float]:
    """Segment the test picture with both; agree when every object's mask IoU ≥ min_iou."""
    picture = test_picture()
    prompt = [[[150, 180]], [[360, 330], [380, 300]], [[60, 450]]]
    expected = reference.segment_image(picture, prompt).best.labels
    got = candidate.segment_image(picture, prompt).best.labels
    worst = min(iou(expected == k, got == k) for k in range(1, len(prompt) + 1))
    return worst >= min_iou, worst
