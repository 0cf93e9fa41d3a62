"""Cross-request decode batching (segmentation/serving/batching.py): clicks merged into one decoder call
answer exactly what each click decoded alone answers. Plain torch, no Ray."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from agreement import assert_labels_agree, label_map_margins
from conftest import HQ_ID, make_picture

from segmentation import service
from segmentation.engine import Segmenter
from segmentation.masks import resize_nearest
from segmentation.prompts import parse_prompt
from segmentation.serving.batching import BatchingSegmenter, DecodeBatcher
from segmentation.settings import Settings

# Clicks on one picture merge whatever their point counts (each object decodes with its own tokens);
# D is on another picture, so it decodes in its own call, not held by the first picture's.
GATE = [[[20, 20], [25, 22]]]
MERGED = {
    "A": [[[40, 30]], [[120, 60], [130, 70]]],
    "B": [[[60, 50], [70, 40], [75, 45]]],
    "C": [[[100, 20], [110, 25]], [[30, 30]]],
}
ALONE = {"D": [[[10, 10]], [[150, 90]]]}


def assert_same_decode(batched, alone) -> None:
    """Equal to float32 rounding, as test_engine asks of any batched decode (a larger batch changes the
    matrix shapes, so sums are added in another order); the label maps are compared exactly."""
    assert batched.prompt == alone.prompt and batched.counts == alone.counts
    torch.testing.assert_close(batched.logits, alone.logits, atol=1e-4, rtol=0)
    # the IoU head is scaled by 10^4 (LOGIT_GAIN): the same tolerance as test_engine
    np.testing.assert_allclose(batched.scores, alone.scores, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("hq_token_only", [False, True])
def test_concurrent_clicks_merge_into_one_decode_that_equals_each_alone(segmenter, hq_token_only):
    embedding = segmenter.embed(make_picture(160, 100, seed=7))
    other = segmenter.embed(make_picture(160, 100, seed=17))
    on = {name: other if name in ALONE else embedding for name in ["GATE", *MERGED, *ALONE]}
    release = threading.Event()

    def decode(embedding, prompt, hq):
        if prompt == prompts["GATE"]:
            assert release.wait(60)  # hold the first call until the others have queued behind it
        return segmenter.decode(embedding, prompt, hq_token_only=hq)

    batcher = DecodeBatcher(decode)
    prompts = {
        name: parse_prompt(points, width=160, height=100) for name, points in {"GATE": GATE, **MERGED, **ALONE}.items()
    }
    with ThreadPoolExecutor(len(prompts)) as pool:
        gate = pool.submit(batcher.decode, embedding, prompts["GATE"], hq_token_only)
        futures = {
            name: pool.submit(batcher.decode, on[name], prompts[name], hq_token_only) for name in [*MERGED, *ALONE]
        }
        futures["D"].result(timeout=60)  # another group: not held by the gate
        deadline = threading.Event()
        while batcher.waiting() < len(MERGED):  # a condition, not a fixed sleep
            assert not deadline.wait(0.01) and not gate.done()
        release.set()
        results = {name: future.result(timeout=60) for name, future in futures.items()}
        gate.result(timeout=60)

    assert (batcher.calls, batcher.requests) == (3, 5)  # gate, A+B+C together (1 to 3 points), D
    for name, decoded in results.items():
        alone = segmenter.decode(on[name], prompts[name], hq_token_only=hq_token_only)
        assert_same_decode(decoded, alone)
        composed = segmenter.compose(on[name], decoded, candidates=2)
        reference = segmenter.segment(on[name], prompts[name], candidates=2, hq_token_only=hq_token_only)
        margins = label_map_margins(on[name], alone, candidates=2)
        for a, b, margin in zip(composed.label_maps, reference.label_maps, margins, strict=True):
            assert_labels_agree(a, b, margin, band=1e-4)  # the batch changes sums' order: rounding may flip


def test_a_failed_merged_decode_fails_every_request_in_it(segmenter):
    embedding = segmenter.embed(make_picture(160, 100, seed=8))
    calls = []

    def decode(embedding, prompt, hq):
        calls.append(prompt)
        raise MemoryError("out of memory")

    batcher = DecodeBatcher(decode)
    prompt = parse_prompt(MERGED["B"], width=160, height=100)
    with pytest.raises(MemoryError):
        batcher.decode(embedding, prompt)
    assert batcher.waiting() == 0 and len(calls) == 1
    with pytest.raises(MemoryError):  # the group was released: a later call runs again
        batcher.decode(embedding, prompt)


def test_service_segment_through_a_batching_segmenter_equals_the_plain_one(segmenter):
    """The replica's path: service.segment (limits, parsing, resizing) over a BatchingSegmenter, 8 clicks at once."""
    settings = Settings(model=HQ_ID, device="cpu", preload_examples=False)
    batching = service.ModelRegistry(
        settings, loader=lambda name, **o: BatchingSegmenter.wrapping(Segmenter.from_pretrained(name, **o))
    )
    plain = service.ModelRegistry(settings)
    picture = make_picture(160, 100, seed=9)
    clicks = [[[[10 + 15 * i, 20 + 8 * i]]] for i in range(8)]

    def run(registry, points):
        return service.segment(registry, image=picture, points=points, candidates=3, size=(80, 50))

    with ThreadPoolExecutor(8) as pool:
        batched = list(pool.map(lambda points: run(batching, points), clicks))
    alone = plain.get(HQ_ID)
    embedding = alone.embed(picture)
    for points, result in zip(clicks, batched):
        reference = run(plain, points)
        assert (result.width, result.height, result.point_tokens) == (80, 50, 1)
        margins = label_map_margins(embedding, alone.decode(embedding, points), candidates=3)
        for a, b, margin in zip(result.candidates, reference.candidates, margins, strict=True):
            assert_labels_agree(a.labels, b.labels, resize_nearest(margin, 80, 50), band=1e-4)
            assert [o.area for o in a.objects] == [int((a.labels == o.value).sum()) for o in a.objects]
    model = batching.get(HQ_ID)
    assert model.batcher.requests == len(clicks) and 1 <= model.batcher.calls <= len(clicks)
