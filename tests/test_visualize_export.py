"""Rendering and exports checked against independent references (pycocotools, rasterised polygons)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from segmentation import export, visualize


def _blobs() -> np.ndarray:
    labels = np.zeros((60, 90), dtype=np.uint8)
    y, x = np.mgrid[0:60, 0:90]
    labels[(x - 25) ** 2 + (y - 30) ** 2 < 15**2] = 1
    labels[10:50, 55:80] = 2
    labels[0, 89] = 2  # a pixel in the corner: runs touching the border
    return labels


def test_overlay_colours_exactly_where_the_label_map_says():
    rgb = np.full((60, 90, 3), 100, dtype=np.uint8)
    labels = _blobs()
    out = visualize.overlay(rgb, labels, opacity=1.0)
    np.testing.assert_array_equal(out[labels == 0], rgb[labels == 0])
    assert (out[labels == 1] == visualize.color(1)).all()
    assert (out[labels == 2] == visualize.color(2)).all()
    half = visualize.overlay(rgb, labels, opacity=0.5)
    assert labels[30, 67] == 2  # well inside object 2: tinted half-way; its border is drawn solid
    assert np.allclose(half[30, 67], (np.array(visualize.color(2)) + 100) / 2, atol=1)
    assert (half[10, 60] == visualize.color(2)).all()


def test_mask_view_cutout_and_thumbnail():
    rgb = np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8)
    labels = _blobs()
    view = visualize.mask_view(labels)
    assert (view[labels == 0] == (24, 24, 27)).all() and (view[labels == 1] == visualize.color(1)).all()
    cut = visualize.cutout(rgb, labels)
    assert cut.shape == (60, 90, 4) and (cut[..., 3] == np.where(labels > 0, 255, 0)).all()
    np.testing.assert_array_equal(cut[..., :3], rgb)
    assert (visualize.cutout(rgb, labels, value=2)[..., 3] > 0).sum() == (labels == 2).sum()
    assert max(visualize.thumbnail(rgb, labels, 1, max_side=45).shape[:2]) == 45


def test_points_are_drawn_in_object_colours_include_and_exclude_differ():
    rgb = np.zeros((100, 100, 3), dtype=np.uint8)
    out = visualize.draw_points(rgb, [([[20, 20]], [1]), ([[70, 70]], [0])], active=0)
    assert tuple(out[20, 20]) == visualize.color(1)
    assert tuple(out[70, 70]) != visualize.color(2)  # exclude: dark centre with a white cross
    ring = out[60:81, 60:81].reshape(-1, 3)
    assert any(tuple(p) == visualize.color(2) for p in ring)


def test_legend_lists_objects_and_escapes_names():
    html = visualize.legend_html(
        [{"value": 1, "name": "<b>x</b>", "score": 0.9, "area": 10, "percent": 1.0, "points": 2}], 0
    )
    assert "&lt;b&gt;" in html and "0.900" in html and "(active)" in html
    assert "No objects yet" in visualize.legend_html([])


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
