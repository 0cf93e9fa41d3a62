"""How two float computations of the same masks may differ, and where they must not.

Two decodes of one prompt on different paths (transformers' forward against ours, a batch of 8 against
a batch of 1, another thread count or BLAS kernel under load) agree to float32 rounding, ~1e-6 in the
logits. A pixel whose logit lies within that noise of zero may land on either side of it, so a mask
compared pixel for pixel is only as exact as its margin: these helpers demand agreement wherever the
reference is farther than `band` from a decision, and bound how many pixels lie inside the band (a real
error shows up as disagreement outside it, or as a band too crowded to be noise).
"""

from __future__ import annotations

import numpy as np
import torch

from segmentation import decoder as dec

# Pixels within the band may flip; a band wider than this share of the picture would hide a real difference
# (two near-identical objects, e.g. two one-point prompts close together, put ~0.1-0.2 % of a map there).
MAX_BAND_SHARE = 0.01


def assert_signs_agree(logits: np.ndarray, reference: np.ndarray, band: float) -> int:
    """Masks (logit > 0) equal wherever |reference| > band; returns how many pixels lie in the band."""
    logits, reference = np.asarray(logits), np.asarray(reference)
    assert logits.shape == reference.shape, (logits.shape, reference.shape)
    in_band = np.abs(reference) <= band
    differ = (logits > 0) != (reference > 0)
    _assert_only_in_band(differ, in_band, "mask")
    return int(in_band.sum())


def decision_margin(per_object_logits: list[np.ndarray] | np.ndarray) -> np.ndarray:
    """Per pixel, how far the label map's decision ("highest logit > 0 wins, else 0") is from changing:
    the smaller of |best logit| and best minus second best (the latter only where there are two objects)."""
    stack = np.asarray(per_object_logits)
    if stack.shape[0] == 1:
        return np.abs(stack[0])
    top2 = np.partition(stack, stack.shape[0] - 2, axis=0)[-2:]
    return np.minimum(np.abs(top2[1]), top2[1] - top2[0])


def assert_labels_agree(labels: np.ndarray, expected: np.ndarray, margin: np.ndarray, band: float) -> int:
    """Label maps equal wherever the reference's `decision_margin` exceeds `band`; returns the band's size."""
    labels, expected = np.asarray(labels), np.asarray(expected)
    assert labels.shape == expected.shape == margin.shape, (labels.shape, expected.shape, margin.shape)
    assert labels.dtype == expected.dtype, (labels.dtype, expected.dtype)
    in_band = margin <= band
    _assert_only_in_band(labels != expected, in_band, "label map")
    return int(in_band.sum())


def _assert_only_in_band(differ: np.ndarray, in_band: np.ndarray, what: str) -> None:
    outside = differ & ~in_band
    assert not outside.any(), (
        f"{what}: {int(outside.sum())} pixel(s) differ outside the rounding band, "
        f"first at {tuple(int(i) for i in np.argwhere(outside)[0])}"
    )
    share = in_band.mean()
    assert share <= MAX_BAND_SHARE, f"{what}: {share:.2%} of the pixels lie in the rounding band"


def label_map_margins(embedding, decoded, candidates: int) -> list[np.ndarray]:
    """The decision margin of each of `segment(..., candidates=n)`'s label maps, from a decode's logits:
    map i gives every object its i-th candidate (one that has fewer repeats its last), upscaled as composed."""
    margins = []
    for i in range(candidates):
        chosen = [decoded.logits[j, min(i, count - 1)] for j, count in enumerate(decoded.counts)]
        stacked = torch.stack([t.float().cpu() for t in chosen])
        margins.append(
            decision_margin(dec.upscale_logits(stacked, embedding.resized_size, embedding.original_size).numpy())
        )
    return margins
