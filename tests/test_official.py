"""The engine against the official SAM-HQ / SAM inference code (tests/official_reference.py).

Each object of a request must get the mask official `SamPredictor.predict` gives that object
alone, whatever else the request holds: the engine decodes a whole request at once, the
reference one object at a time. IoU >= 0.999 per candidate mask, predicted IoU within 1e-4.

The test checkpoints scale the IoU head by LOGIT_GAIN (10^4, see conftest), which scales the
predictions' float32 rounding with them: the predicted-IoU tolerance is 1e-4 relative to the
prediction's size (at least 1e-4 absolute).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_picture
from official_reference import LayerNorm2d, OfficialPredictor, _rename, official_state_dict, predict_object

from segmentation import decoder as dec

MIN_IOU = 0.999
SCORE_TOLERANCE = 1e-4

# (points, labels, box) per object: one point, three points (mixed counts in one request), an
# exclude point, box alone, box + one point, box + points, edge points (the picture's last pixel).
OBJECTS = [
    ([[60, 70]], [1], None),
    ([[100, 80], [130, 95], [20, 150]], [1, 1, 0], None),
    ([], [], [30, 40, 200, 150]),
    ([[70, 75]], [1], [10, 10, 300, 190]),
    ([[319, 199]], [1], None),
    ([[0, 0], [250, 60]], [1, 0], [0, 0, 320, 200]),
    ([[230, 120], [250, 60]], [1, 0], None),
    ([], [], [200, 100, 319.5, 199.5]),
]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def _check_against_official(seg, rgb, objects, hq_token_only=False):
    embedding = seg.embed(rgb)
    reference = OfficialPredictor(seg.model, seg.loaded.processor)
    reference.set_image(rgb)
    decoded = seg.decode(
        embedding,
        [o[0] for o in objects],
        [o[1] for o in objects],
        [o[2] for o in objects],
        hq_token_only=hq_token_only,
    )
    for i, (points, labels, box) in enumerate(objects):
        ref_logits, ref_scores = predict_object(reference, points, labels, box, hq_token_only=hq_token_only)
        count = decoded.counts[i]
        assert count == len(ref_logits), f"object {i + 1}: {count} candidates, official {len(ref_logits)}"
        ours = dec.upscale_logits(decoded.logits[i, :count], embedding.resized_size, embedding.original_size).numpy()
        assert ours.shape == ref_logits.shape
        assert np.abs(ref_logits).max() > 0.1, "logits too small for the comparison to mean anything"
        for k in range(count):
            iou = _iou(ours[k] > 0, ref_logits[k] > 0)
            assert iou >= MIN_IOU, f"object {i + 1} candidate {k + 1}: IoU {iou:.5f} against official"
            score, ref = float(decoded.scores[i, k]), float(ref_scores[k])
            assert abs(score - ref) <= SCORE_TOLERANCE * max(1.0, abs(ref)), f"object {i + 1}: {score} vs {ref}"


@pytest.mark.parametrize("family, hq_token_only", [("hq", False), ("hq", True), ("sam", False)])
def test_every_object_of_a_mixed_request_gets_its_official_mask(family, hq_token_only, segmenter, sam_segmenter):
    seg = segmenter if family == "hq" else sam_segmenter
    _check_against_official(seg, make_picture(320, 200, seed=2), OBJECTS, hq_token_only)


@pytest.mark.parametrize("width, height", [(200, 260), (97, 31)])
def test_single_objects_on_non_square_pictures(width, height, segmenter):
    rgb = make_picture(width, height, seed=4)
    for obj in (
        ([[width - 1, height - 1]], [1], None),
        ([[0, height // 2], [width // 2, 0]], [1, 1], None),
        ([], [], [0, 0, width, height]),
        ([[width // 3, height // 3]], [0], [width / 4, height / 4, width - 0.5, height - 0.5]),
    ):
        _check_against_official(segmenter, rgb, [obj])


def test_one_point_object_is_unchanged_by_a_three_point_neighbour(segmenter):
    """The old padding bug: a 1-point object beside a 3-point one got two extra "not a point" tokens."""
    rgb = make_picture(320, 200, seed=6)
    embedding = segmenter.embed(rgb)
    alone = segmenter.decode(embedding, [[[60, 70]]])
    together = segmenter.decode(embedding, [[[60, 70]], [[100, 80], [130, 95], [20, 150]]])
    torch.testing.assert_close(together.logits[0], alone.logits[0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(together.scores[0], alone.scores[0], rtol=1e-5)


def test_the_weights_map_one_to_one_onto_the_official_modules(segmenter, sam_segmenter):
    """Every official parameter comes from the checkpoint (strict load, same names both ways), and every
    norm of the prompt and decoder path has the official epsilon in our loaded model."""
    for seg in (segmenter, sam_segmenter):
        reference = OfficialPredictor(seg.model, seg.loaded.processor)
        mapped = official_state_dict(seg.model)
        names = {name for name, _ in reference.model.named_parameters()}
        names |= {name for name, _ in reference.model.named_buffers()}
        assert names == set(mapped)
        ours = {
            _rename(f"{name}.weight").rsplit(".", 1)[0]: module.eps
            for name, module in seg.model.named_modules()
            if isinstance(module, torch.nn.LayerNorm) and not name.startswith("vision_encoder")
        }
        official = {
            name: module.eps
            for name, module in reference.model.named_modules()
            if isinstance(module, (torch.nn.LayerNorm, LayerNorm2d))
        }
        assert ours == official


def test_vit_norms_match_the_official_build():
    """The ViT is not ported; its norms are checked against official build_sam (eps 1e-6 throughout)."""
    from conftest import HQ_ID

    from segmentation.models import load_model

    model = load_model(HQ_ID).model
    vit_norms = [m for n, m in model.named_modules() if n.startswith("vision_encoder") and "norm" in n.split(".")[-1]]
    assert vit_norms and all(m.eps == 1e-6 for m in vit_norms)
