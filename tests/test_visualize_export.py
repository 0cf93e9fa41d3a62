"""The cut-out and exports checked against independent references (pycocotools, rasterised polygons)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from segmentation import export
from ui import pictures


def _blobs() -> np.ndarray:
    labels = np.zeros((60, 90), dtype=np.uint8)
    y, x = np.mgrid[0:60, 0:90]
    labels[(x - 25) ** 2 + (y - 30) ** 2 < 15**2] = 1
    labels[10:50, 55:80] = 2
    labels[0, 89] = 2  # a pixel in the corner: runs touching the border
    return labels


def test_cutout_keeps_the_picture_where_the_objects_are():
    rgb = np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8)
    labels = _blobs()
    cut = pictures.cutout(rgb, labels)
    assert cut.shape == (60, 90, 4) and (cut[..., 3] == np.where(labels > 0, 255, 0)).all()
    np.testing.assert_array_equal(cut[..., :3], rgb)
    assert (pictures.cutout(rgb, labels, value=2)[..., 3] > 0).sum() == (labels == 2).sum()
    assert pictures.preview_size(4000, 3000) == (1024, 768) and pictures.preview_size(300, 200) == (300, 200)
    assert pictures.hex_color(1) == "#e69f00" and pictures.hex_color(len(pictures.PALETTE) + 1) == "#e69f00"


def test_rle_matches_pycocotools():
    mask_api = pytest.importorskip("pycocotools.mask")
    labels = _blobs()
    for value in (1, 2):
        mask = labels == value
        ours = export.rle_encode(mask)
        theirs = mask_api.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert ours["counts"] == theirs["counts"].decode()
        assert ours["size"] == list(theirs["size"])
        np.testing.assert_array_equal(mask_api.decode({"size": ours["size"], "counts": ours["counts"].encode()}), mask)
    assert export.rle_counts(np.zeros((2, 2), bool)) == [4]
    assert export.rle_counts(np.ones((2, 2), bool)) == [0, 4]


def test_polygons_rasterise_back_to_the_mask():
    labels = _blobs()
    mask = labels == 1
    polys = export.polygons(mask)
    assert polys and all(len(p) % 2 == 0 for p in polys)
    canvas = Image.new("L", (90, 60), 0)
    draw = ImageDraw.Draw(canvas)
    for poly in polys:
        draw.polygon(list(zip(poly[0::2], poly[1::2])), fill=1)
    drawn = np.asarray(canvas).astype(bool)
    iou = (drawn & mask).sum() / (drawn | mask).sum()
    assert iou > 0.9


def test_objects_document_and_snippet():
    from segmentation.engine import ObjectResult

    labels = _blobs()
    objects = [
        ObjectResult(1, 0.9, int((labels == 1).sum()), (10, 15, 39, 44)),
        ObjectResult(2, 0.8, int((labels == 2).sum()), None),
    ]
    doc = export.objects_document(
        labels, objects, [{"points": [[25, 30]], "labels": [1]}, {"points": [[60, 20]], "labels": [1]}], "m"
    )
    assert doc["width"] == 90 and doc["height"] == 60 and len(doc["objects"]) == 2
    assert doc["objects"][0]["rle"]["size"] == [60, 90] and doc["objects"][0]["polygons"]
    snippet = export.api_snippets("http://127.0.0.1:7860", "m", [[[25, 30]]], [[1]], "cat.jpg")
    compile(snippet, "snippet", "exec")
    assert "SegmentationClient" in snippet and "AIRefinery" in snippet
