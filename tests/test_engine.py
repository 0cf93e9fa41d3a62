"""The engine: its cached decode against transformers' own forward, its label maps against the
official reference (tests/official_reference.py; each object's official mask is checked in
tests/test_official.py), and its policies."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from agreement import assert_labels_agree, assert_signs_agree, decision_margin
from conftest import make_picture
from official_reference import OfficialPredictor, predict_object
from reference import PAD, reference_label_map, reference_object_logits

from segmentation import InvalidPromptError
from segmentation import decoder as dec
from segmentation.engine import MAX_DECODE_BATCH
from segmentation.prompts import layout_arrays, parse_prompt

# Non-square picture; one-point and several-point objects; exclude points; objects that overlap.
PROMPT = [[[60, 70]], [[100, 80], [130, 95], [20, 150]], [[230, 120], [250, 60]], [[70, 75]]]
LABELS = [[1], [1, 1, 0], [1, 0], [1]]
TOLERANCE = 1e-4  # two float32 paths to the same logits (order 1 with LOGIT_GAIN) agree this closely


def _our_logits(segmenter, embedding, prompt, labels, hq_token_only=False):
    """Our cached, batched decode, upscaled: one ((K, H, W) logits, (K,) scores) per object."""
    decoded = segmenter.decode(embedding, prompt, labels, hq_token_only=hq_token_only)
    result = []
    for i in range(len(prompt)):
        count = decoded.counts[i]
        logits = dec.upscale_logits(decoded.logits[i, :count], embedding.resized_size, embedding.original_size)
        result.append((logits.numpy(), decoded.scores[i, :count]))
    return result


def _official(seg, rgb, prompt, labels):
    reference = OfficialPredictor(seg.model, seg.loaded.processor)
    reference.set_image(rgb)
    return [predict_object(reference, obj, lab) for obj, lab in zip(prompt, labels)]


@pytest.mark.parametrize("family, hq_token_only", [("hq", False), ("hq", True), ("sam", False)])
def test_cached_decode_equals_uncached_full_forward(family, hq_token_only, segmenter, sam_segmenter):
    seg = segmenter if family == "hq" else sam_segmenter
    rgb = make_picture(320, 200)
    embedding = seg.embed(rgb)
    ours = _our_logits(seg, embedding, PROMPT, LABELS, hq_token_only)
    for (logits, scores), obj, labels in zip(ours, PROMPT, LABELS):
        ref_logits, ref_scores = reference_object_logits(
            seg.model, seg.loaded.processor, rgb, obj, labels, hq_token_only=hq_token_only
        )
        assert np.abs(ref_logits).max() > 0.1, "logits too small for the tolerance to mean anything"
        assert logits.shape == ref_logits.shape
        np.testing.assert_allclose(logits, ref_logits, atol=TOLERANCE, rtol=0)
        assert_signs_agree(logits, ref_logits, band=TOLERANCE)  # a logit within the tolerance of 0 may flip
        np.testing.assert_allclose(scores, ref_scores, atol=1e-4, rtol=1e-4)  # IoU head × 10^4 (LOGIT_GAIN)


@pytest.mark.parametrize("family", ["hq", "sam"])
def test_label_map_equals_per_object_reference(family, segmenter, sam_segmenter):
    seg = segmenter if family == "hq" else sam_segmenter
    rgb = make_picture(320, 200, seed=3)
    result = seg.segment(seg.embed(rgb), PROMPT, LABELS, candidates=3)
    refs = _official(seg, rgb, PROMPT, LABELS)
    assert (np.stack([r[0][0] > 0 for r in refs]).sum(axis=0) >= 2).any(), "the prompt must make objects overlap"
    for i, candidate in enumerate(result.candidates):
        chosen = [logits[min(i, len(logits) - 1)] for logits, _ in refs]
        expected = reference_label_map(chosen)
        assert candidate.labels.shape == (200, 320)
        assert candidate.labels.dtype == np.uint8
        assert_labels_agree(candidate.labels, expected, decision_margin(chosen), band=TOLERANCE)
        for obj, (_, scores) in zip(candidate.objects, refs):
            assert obj.score == pytest.approx(float(scores[min(i, len(scores) - 1)]), rel=1e-4, abs=1e-4)
            mask = candidate.labels == obj.value
            assert obj.area == int(mask.sum())
            if obj.area:
                ys, xs = np.nonzero(mask)
                assert obj.bbox == (xs.min(), ys.min(), xs.max(), ys.max())
            else:
                assert obj.bbox is None


def test_objects_decode_per_token_layout_in_chunks_of_max_batch(segmenter, picture):
    """No padding between objects: one decoder call per layout (point count, box or not), at most
    MAX_DECODE_BATCH objects each, results back in the prompt's order."""
    embedding = segmenter.embed(picture)
    final_attention = segmenter.model.mask_decoder.transformer.final_attn_token_to_image
    batches = []
    hook = final_attention.register_forward_hook(
        lambda m, args, kwargs, out: batches.append(out[0].shape[1]), with_kwargs=True
    )
    try:
        boxes = [None, None, None, None, [10, 10, 200, 150], [20, 20, 100, 100]]
        decoded = segmenter.decode(embedding, PROMPT + [[], [[50, 50]]], LABELS + [[], [1]], boxes)
        many = segmenter.decode(embedding, [[[i % 300, 10]] for i in range(MAX_DECODE_BATCH + 3)])
    finally:
        hook.remove()
    # 1 point ×2, 3 points, 2 points, box alone, box + 1 point; then a chunk and the rest
    assert batches == [2, 1, 1, 1, 1, MAX_DECODE_BATCH, 3]
    assert decoded.counts == (3, 1, 1, 3, 1, 1)  # one point alone is ambiguous, with a box it is not
    small = segmenter.decode(embedding, [[[i % 300, 10]] for i in range(MAX_DECODE_BATCH + 3)], max_batch=4)
    torch.testing.assert_close(small.logits, many.logits, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="max_batch"):
        segmenter.decode(embedding, [[[1, 1]]], max_batch=0)


def test_candidates_rank_by_predicted_iou_and_single_masks_repeat(segmenter, picture):
    result = segmenter.segment(segmenter.embed(picture), PROMPT, LABELS, candidates=3)
    assert len(result.candidates) == 3
    first, second, third = result.candidates
    # object 1 is a single point: three distinct candidates in descending score
    scores = [c.objects[0].score for c in result.candidates]
    assert scores == sorted(scores, reverse=True)
    # object 2 has several points: one mask, repeated
    assert first.objects[1].score == second.objects[1].score == third.objects[1].score
    assert first.score == pytest.approx(np.mean([o.score for o in first.objects]))


def test_hq_token_only_gives_one_mask_per_object_with_its_best_score(segmenter, picture):
    embedding = segmenter.embed(picture)
    result = segmenter.segment(embedding, [[[60, 70]]], candidates=3, hq_token_only=True)
    maps = result.label_maps
    assert all((m == maps[0]).all() for m in maps)
    default = segmenter.segment(embedding, [[[60, 70]]], candidates=3)
    # HQ-only scores the single HQ mask with the best multimask prediction
    assert result.best.objects[0].score == pytest.approx(default.best.objects[0].score)


def test_exclude_is_label_zero_and_changes_the_mask(segmenter, picture):
    embedding = segmenter.embed(picture)
    include = segmenter.segment(embedding, [[[60, 70], [100, 80]]], [[1, 1]]).best.labels
    exclude = segmenter.segment(embedding, [[[60, 70], [100, 80]]], [[1, 0]]).best.labels
    assert not np.array_equal(include, exclude)
    with pytest.raises(InvalidPromptError, match="not a point"):
        segmenter.segment(embedding, [[[60, 70], [100, 80]]], [[1, -1]])


def test_transformers_label_minus_one_discards_the_point():
    """The trap behind rejecting -1: transformers embeds a -1 point as 'not a point', position ignored."""
    from conftest import HQ_ID
    from transformers import SamHQModel

    model = SamHQModel.from_pretrained(HQ_ID)
    with torch.inference_mode():
        a = model.prompt_encoder(torch.tensor([[[[10.0, 20.0]]]]), torch.tensor([[[-1]]]), None, None)[0]
        b = model.prompt_encoder(torch.tensor([[[[500.0, 900.0]]]]), torch.tensor([[[-1]]]), None, None)[0]
    torch.testing.assert_close(a, b)
    assert PAD == -1


def test_embeddings_without_intermediate_silently_drop_hq_fusion(segmenter, picture):
    """The trap the cache avoids: transformers accepts image_embeddings alone and quietly skips the HQ features."""
    model, processor = segmenter.model, segmenter.loaded.processor
    inputs = processor(images=picture, input_points=[[[[60, 70]]]], return_tensors="pt")
    with torch.inference_mode():
        image_embeddings, intermediate = model.get_image_embeddings(inputs["pixel_values"])
        points = dict(input_points=inputs["input_points"], multimask_output=False)
        without = model(image_embeddings=image_embeddings, **points).pred_masks
        with_hq = model(image_embeddings=image_embeddings, intermediate_embeddings=intermediate, **points).pred_masks
    assert not torch.allclose(without, with_hq)
    embedding = segmenter.embed(picture)
    assert embedding.features.hq_features is not None
    expected = dec.hq_picture_features(model, image_embeddings, intermediate[0])
    torch.testing.assert_close(embedding.features.hq_features, expected)


def test_more_than_255_objects_give_a_uint16_map(segmenter, monkeypatch):
    from segmentation import engine

    monkeypatch.setattr(engine, "MAX_DECODE_BATCH", 64)  # fewer, larger calls: faster on the tiny test model
    rgb = make_picture(64, 48)
    prompt = [[[float(i % 64), float(i // 64 * 10)]] for i in range(260)]
    embedding = segmenter.embed(rgb)
    parsed = parse_prompt(prompt, width=64, height=48, max_objects=300)
    result = segmenter.segment(embedding, parsed)
    assert result.best.labels.dtype == np.uint16
    assert result.best.labels.max() <= 260
    assert len(result.best.objects) == 260


def test_segment_validates_candidates_and_model(segmenter, sam_segmenter, picture):
    embedding = segmenter.embed(picture)
    for bad in (0, 4, True, 1.5):
        with pytest.raises(InvalidPromptError, match="from 1 to 3"):
            segmenter.segment(embedding, [[[1, 1]]], candidates=bad)
    with pytest.raises(ValueError, match="made by"):
        sam_segmenter.segment(embedding, [[[1, 1]]])


def test_float_coordinates_are_accepted(segmenter, picture):
    embedding = segmenter.embed(picture)
    result = segmenter.segment(embedding, [[[60.25, 70.75]]])
    assert result.best.labels.shape == picture.shape[:2]


def test_embedding_entry_keeps_picture_only_features(segmenter, sam_segmenter, picture):
    hq = segmenter.embed(picture)
    features = hq.features
    channels = segmenter.model.config.mask_decoder_config.hidden_size
    assert features.grid == (64, 64) and hq.grid_tokens == 4096
    assert features.tokens.shape == (1, 1, 4096, channels)
    for projection in (features.keys, features.values, features.queries):
        assert projection.shape == (1, 1, 4096, channels // 2)  # the attention's downsampled width
    assert features.hq_features.shape == (1, channels // 8, 256, 256)
    assert hq.nbytes == sum(t.numel() * 4 for t in features.tensors()) and len(features.tensors()) == 5
    sam = sam_segmenter.embed(picture)
    assert sam.features.hq_features is None and len(sam.features.tensors()) == 4


def test_choices_pick_each_objects_candidate(segmenter, picture):
    embedding = segmenter.embed(picture)
    ranked = segmenter.segment(embedding, PROMPT, LABELS, candidates=3)
    mixed = segmenter.segment(embedding, PROMPT, LABELS, choices=[[2, 0, 0, 1]]).best
    # the same objects, each with the chosen candidate: equals a label map built from the official masks
    refs = _official(segmenter, picture, PROMPT, LABELS)
    plan = [2, 0, 0, 1]
    chosen = [logits[min(c, len(logits) - 1)] for (logits, _), c in zip(refs, plan)]
    assert_labels_agree(mixed.labels, reference_label_map(chosen), decision_margin(chosen), band=TOLERANCE)
    assert [o.candidate for o in mixed.objects] == [2, 0, 0, 1]
    assert [o.candidates for o in mixed.objects] == [3, 1, 1, 3]
    assert mixed.objects[0].score == ranked.candidates[2].objects[0].score
    with pytest.raises(InvalidPromptError, match="one candidate index per object"):
        segmenter.segment(embedding, PROMPT, LABELS, choices=[[0, 0]])
    with pytest.raises(InvalidPromptError, match="0, 1 or 2"):
        segmenter.segment(embedding, PROMPT, LABELS, choices=[[0, 0, 3, 0]])


def _as_tensor(array, dtype=torch.float32):
    return None if array is None else torch.tensor(array, dtype=dtype)


@pytest.mark.parametrize("family", ["sam_hq", "sam"])
def test_decoder_equals_official_at_the_published_sizes(family):
    """The tiny test checkpoints run other kernel shapes than production: check the decoder against
    the official port at ViT-B's sizes too (256-wide two-way transformer, 64×64 grid, 768-wide ViT
    features), a mixed request of several layouts at once."""
    from segmentation.offline import build_processor, build_random_model

    model = build_random_model(family, "base-decoder", seed=5, logit_gain=200.0)  # logits of a trained model's order
    dec.use_official_layer_norms(model)  # what models.load_model does
    generator = torch.Generator().manual_seed(0)
    image_embeddings = torch.randn(1, 256, 64, 64, generator=generator)
    vit_features = torch.randn(1, 64, 64, 768, generator=generator) if family == "sam_hq" else None
    objects = [[[300.0, 420.0]], [[700.0, 200.0], [650.0, 260.0], [100.0, 900.0]], [[512.0, 512.0], [40.0, 60.0]], []]
    labels = [[1], [1, 1, 0], [1, 0], []]
    boxes = [None, None, [30.0, 40.0, 600.0, 500.0], [100.0, 100.0, 1000.0, 800.0]]
    parsed = parse_prompt(objects, labels, boxes, width=1024, height=1024)

    reference = OfficialPredictor(model, build_processor(family))
    reference.features, reference.interm_features = (
        image_embeddings,
        [vit_features] if vit_features is not None else None,
    )
    reference.original_size = reference.input_size = (1024, 1024)

    positions = dec.positional_tokens(model)
    features = dec.picture_features(model, image_embeddings, vit_features, positions)
    for group in parsed.layout_groups():
        points, point_labels, group_boxes = layout_arrays([parsed.objects[i] for i in group])
        output = dec.decode(
            model,
            features,
            positions,
            _as_tensor(points),
            _as_tensor(point_labels, torch.int64),
            _as_tensor(group_boxes),
        )
        ambiguous = torch.tensor([parsed.objects[i].ambiguous for i in group])
        ranked = dec.rank_candidates(output, ambiguous)
        for row, i in enumerate(group):
            obj = parsed.objects[i]
            _, scores, low_res = reference.predict(
                np.array(obj.points).reshape(-1, 2) if obj.points else None,
                np.array(obj.labels) if obj.points else None,
                np.array(obj.box) if obj.box else None,
                multimask_output=obj.ambiguous,
            )
            order = np.argsort(-scores, kind="stable")
            expected = torch.from_numpy(low_res[order])
            count = int(ranked.counts[row])
            scale = float(expected.abs().max())
            assert scale > 0.1
            if family == "sam_hq" and obj.ambiguous:  # official SAM-HQ returns its best multimask mask only
                count, expected = 1, expected[:1]
            ours, expected = ranked.logits[row, :count], expected[:count]
            torch.testing.assert_close(ours, expected, atol=1e-5 * scale, rtol=0)
            assert_signs_agree(ours.numpy(), expected.numpy(), band=1e-5 * scale)
            torch.testing.assert_close(
                ranked.scores[row, :count], torch.from_numpy(scores[order][:count]), atol=0, rtol=1e-4
            )


def test_a_kept_decode_composes_any_choice_like_segment(segmenter, sam_segmenter, picture):
    embedding = segmenter.embed(picture)
    decoded = segmenter.decode(embedding, PROMPT, LABELS)
    assert segmenter.decode(embedding, PROMPT, LABELS, reuse=decoded) is decoded
    assert segmenter.decode(embedding, PROMPT, LABELS, hq_token_only=True, reuse=decoded) is not decoded
    assert segmenter.decode(embedding, PROMPT[:2], LABELS[:2], reuse=decoded) is not decoded
    kept = decoded.on_host()
    assert kept.logits.device.type == "cpu" and segmenter.decode(embedding, PROMPT, LABELS, reuse=kept) is kept
    sam_embedding = sam_segmenter.embed(picture)  # no HQ token: "HQ token only" changes nothing, so reuse
    plain = sam_segmenter.decode(sam_embedding, PROMPT, LABELS)
    assert sam_segmenter.decode(sam_embedding, PROMPT, LABELS, hq_token_only=True, reuse=plain) is plain
    for options in ({"candidates": 3}, {"choices": [[2, 0, 0, 1], [1, 0, 0, 2]]}):
        composed = segmenter.compose(embedding, kept, **options)
        direct = segmenter.segment(embedding, PROMPT, LABELS, **options)
        for a, b in zip(composed.candidates, direct.candidates, strict=True):
            np.testing.assert_array_equal(a.labels, b.labels)
            assert a.objects == b.objects
    other = segmenter.embed(make_picture(120, 90, seed=3))
    with pytest.raises(ValueError, match="another picture"):
        segmenter.compose(other, decoded)
    with pytest.raises(InvalidPromptError, match="from 1 to 3"):
        segmenter.compose(embedding, decoded, candidates=4)


def test_a_vit_b_entry_is_under_10_mb_at_half_precision():
    """The performance target for GPU caches, checked by building the entry at ViT-B's sizes."""
    from segmentation.offline import build_random_model

    model = build_random_model("sam_hq", "base-decoder", seed=6).to(torch.bfloat16)
    embeddings = torch.randn(1, 256, 64, 64, dtype=torch.bfloat16)
    vit = torch.randn(1, 64, 64, 768, dtype=torch.bfloat16)
    features = dec.picture_features(model, embeddings, vit, dec.positional_tokens(model))
    assert all(t.dtype == torch.bfloat16 for t in features.tensors())
    assert features.nbytes == 9 * 2**20  # tokens 2 MiB + three projections 3 MiB + HQ features 4 MiB


@pytest.mark.parametrize("chunk_objects", [1, 2, 64])  # objects upscaled at once: several chunks, or one
def test_label_map_composition_in_chunks_keeps_the_rule(monkeypatch, chunk_objects):
    from segmentation import masks

    original, resized = (60, 90), (683, 1024)
    monkeypatch.setattr(masks, "_MAX_UPSCALED_VALUES", chunk_objects * original[0] * original[1])
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(5, 256, 256, generator=generator)
    logits[3] = logits[1]  # exact ties: the earlier object keeps the pixel, across chunks too
    logits[4] = -logits[4].abs()  # an object that claims nothing
    composed = masks.compose_label_map(logits, resized, original)
    assert composed.dtype == torch.uint8
    per_object = [dec.upscale_logits(logits[i : i + 1], resized, original)[0].numpy() for i in range(5)]
    expected = reference_label_map(per_object)
    np.testing.assert_array_equal(composed.numpy(), expected)
    assert 4 not in expected and 5 not in expected and {1, 2, 3} <= set(np.unique(expected))


def test_a_kept_decode_is_reused_only_for_the_same_boxes(segmenter, picture):
    embedding = segmenter.embed(picture)
    points, labels = [[], [[60, 70]]], [[], [1]]
    decoded = segmenter.decode(embedding, points, labels, [[10, 10, 200, 150], None])
    assert segmenter.decode(embedding, points, labels, [[10.0, 10.0, 200.0, 150.0], None], reuse=decoded) is decoded
    moved = segmenter.decode(embedding, points, labels, [[10, 10, 201, 150], None], reuse=decoded)
    assert moved is not decoded and not torch.equal(moved.logits[0], decoded.logits[0])
    assert segmenter.decode(embedding, [[[60, 70]]], reuse=decoded) is not decoded
    # a box makes a one-point object unambiguous: one candidate, as official decodes it
    assert segmenter.decode(embedding, [[[60, 70]]], None, [[0, 0, 100, 100]]).counts == (1,)
