"""Prompt validation names the culprit; coordinate transforms match transformers' processor."""

from __future__ import annotations

import math

import numpy as np
import pytest

from segmentation import InvalidPromptError
from segmentation.prompts import layout_arrays, parse_prompt, resized_shape, to_model_coordinates


def parse(points, labels=None, boxes=None, **kw):
    return parse_prompt(points, labels, boxes, width=kw.pop("width", 100), height=kw.pop("height", 50), **kw)


def test_valid_prompt_defaults_to_include():
    prompt = parse([[[1, 2]], [[3.5, 4.25], [5, 6]]])
    assert [obj.labels for obj in prompt.objects] == [(1,), (1, 1)]
    assert prompt.objects[1].points == ((3.5, 4.25), (5.0, 6.0))
    assert prompt.objects[0].ambiguous and not prompt.objects[1].ambiguous
    assert prompt.point_count == 3


@pytest.mark.parametrize(
    "points, labels, message",
    [
        ([], None, "no objects"),
        ("[[1,2]]", None, "list of objects"),
        ([[]], None, "object 1 has no points"),
        ([[[1, 2]], []], None, "object 2 has no points"),
        ([[1, 2]], None, r"object 1, point 1 must be \[x, y\], got int \(the prompt nests objects"),
        ([[[1, 2]], 5], None, "object 2 must be a list"),
        ([[[1, 2, 3]]], None, r"object 1, point 1 must be \[x, y\], got 3 values"),
        ([[[1, 2], [1]]], None, "object 1, point 2 must be"),
        ([[["a", 2]]], None, "must be numbers"),
        ([[[True, 2]]], None, "must be numbers"),
        ([[[math.nan, 2]]], None, "finite"),
        ([[[1, math.inf]]], None, "finite"),
        ([[[100, 2]]], None, r"outside the 100x50 picture"),
        ([[[-1, 2]]], None, "outside"),
        ([[[1, 2]], [[5, 50]]], None, "object 2, point 1: .* outside"),
        ([[[1, 2]]], [[2]], "label must be 1 .include. or 0 .exclude."),
        ([[[1, 2]]], [[-1]], "'not a point'; use 0"),
        ([[[1, 2]]], [[1, 0]], "object 1 has 1 points but point_labels gives 2"),
        ([[[1, 2]]], [[1], [1]], "one list per object"),
        ([[[1, 2]]], [["1"]], "label must be"),
    ],
)
def test_bad_prompts_name_the_problem(points, labels, message):
    with pytest.raises(InvalidPromptError, match=message):
        parse(points, labels)


def test_limits():
    with pytest.raises(InvalidPromptError, match="3 objects; the limit is 2"):
        parse([[[1, 1]]] * 3, max_objects=2)
    with pytest.raises(InvalidPromptError, match="object 1 has 5 points; the limit is 4"):
        parse([[[1, 1]] * 5], max_points=4)


def test_errors_are_value_errors_with_the_param():
    with pytest.raises(ValueError) as info:
        parse([[[1, 2]]], [[7]])
    assert info.value.param == "point_labels"


def test_objects_group_by_token_layout_without_padding():
    prompt = parse(
        [[[1, 2]], [[3, 4], [5, 6], [7, 8]], [], [[9, 9]], [[1, 1]], [[2, 2], [3, 3], [4, 4]]],
        [[1], [1, 0, 1], [], [0], [1], [1, 1, 1]],
        [None, None, [0, 0, 10, 10], [5, 5, 20, 20], None, None],
    )
    assert prompt.layout_groups() == [[0, 4], [1, 5], [2], [3]]
    assert [o.ambiguous for o in prompt.objects] == [True, False, False, False, True, False]
    assert prompt.point_count == 1 + 3 + 2 + (1 + 2) + 1 + 3  # a box costs two tokens (its corners)
    points, labels, boxes = layout_arrays([prompt.objects[i] for i in (1, 5)])
    assert points.shape == (2, 3, 2) and boxes is None
    np.testing.assert_array_equal(labels, [[1, 0, 1], [1, 1, 1]])  # no pad label: the prompt encoder adds one
    points, labels, boxes = layout_arrays([prompt.objects[2]])
    assert points is None and labels is None
    np.testing.assert_array_equal(boxes, [[0, 0, 10, 10]])
    with pytest.raises(ValueError, match="share one layout"):
        layout_arrays(prompt.objects[:2])


def test_boxes_parse_and_compare():
    a = parse([[], [[1, 2]]], [[], [1]], [[0, 0, 100, 50], None])
    b = parse([[], [[1, 2]]], None, [(0.0, 0.0, 100.0, 50.0), None])
    assert a == b and a.objects[0].box == (0.0, 0.0, 100.0, 50.0) and a.objects[1].box is None
    assert a != parse([[], [[1, 2]]], None, [[0, 0, 99, 50], None])  # a decode is reused only for the same box
    assert parse([[[1, 2]]], None, np.array([[1.5, 2, 3, 4]])).objects[0].box == (1.5, 2.0, 3.0, 4.0)


@pytest.mark.parametrize(
    "points, boxes, message",
    [
        ([[[1, 2]]], [None, None], r"box_prompt must have one box \(or null\) per object .*1 objects\), got 2 boxes"),
        ([[[1, 2]]], "box", "box_prompt must have one box .*not a list"),
        ([[[1, 2]]], [[1, 2, 3]], r"object 1: the box must be \[x0, y0, x1, y1\] or null, got 3 values"),
        ([[[1, 2]]], [5], "the box must be .* got int"),
        ([[[1, 2]]], [[10, 10, 5, 20]], "inverted or empty"),
        ([[[1, 2]]], [[10, 10, 20, 10]], "inverted or empty"),
        ([[[1, 2]]], [[-1, 0, 20, 10]], "outside the 100x50 picture"),
        ([[[1, 2]]], [[0, 0, 101, 10]], "outside the 100x50 picture"),
        ([[[1, 2]]], [[0, 0, 10, "a"]], "box coordinates must be numbers"),
        ([[[1, 2]]], [[0, 0, True, 10]], "box coordinates must be numbers"),
        ([[[1, 2]]], [[0, 0, math.inf, 10]], "box coordinates must be finite"),
        ([[[1, 2]]], [[0, 0, math.nan, 10]], "box coordinates must be finite"),
        ([[[1, 2]]], [[0, 0, 10**400, 10]], "box coordinates must be finite"),
        ([[[1, 2]], []], [None, None], "object 2 has neither points nor a box"),
    ],
)
def test_bad_boxes_name_the_problem(points, boxes, message):
    with pytest.raises(InvalidPromptError, match=message) as info:
        parse(points, None, boxes)
    assert info.value.param == "box_prompt"


def test_huge_integer_coordinates_are_invalid_prompts_not_overflow():
    with pytest.raises(InvalidPromptError, match="finite") as info:
        parse([[[10**400, 2]]])
    assert info.value.param == "segment_prompt"


@pytest.mark.parametrize("size", [(200, 320), (320, 200), (1, 5000), (1024, 1024), (999, 1001)])
def test_coordinates_match_the_processor(size, segmenter):
    height, width = size
    processor = segmenter.loaded.processor
    resized = resized_shape(height, width)
    assert resized == tuple(processor.image_processor._get_preprocess_shape((height, width), 1024))
    points = np.array([[[0.0, 0.0], [width - 1, height - 1], [width / 3, height / 7]]])
    expected = processor._normalize_coordinates(1024, points[0], (height, width))
    np.testing.assert_allclose(to_model_coordinates(points, (height, width), resized)[0], expected)
