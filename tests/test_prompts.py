"""Prompt validation names the culprit; coordinate transforms match transformers' processor."""

from __future__ import annotations

import math

import numpy as np
import pytest

from segmentation import InvalidPromptError
from segmentation.prompts import PAD_LABEL, padded_arrays, parse_prompt, resized_shape, to_model_coordinates


def parse(points, labels=None, **kw):
    return parse_prompt(points, labels, width=kw.pop("width", 100), height=kw.pop("height", 50), **kw)


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


def test_padding_uses_not_a_point():
    points, labels = padded_arrays(parse([[[1, 2]], [[3, 4], [5, 6], [7, 8]]], [[1], [1, 0, 1]]))
    assert points.shape == (2, 3, 2)
    np.testing.assert_array_equal(labels, [[1, PAD_LABEL, PAD_LABEL], [1, 0, 1]])


@pytest.mark.parametrize("size", [(200, 320), (320, 200), (1, 5000), (1024, 1024), (999, 1001)])
def test_coordinates_match_the_processor(size, segmenter):
    height, width = size
    processor = segmenter.loaded.processor
    resized = resized_shape(height, width)
    assert resized == tuple(processor.image_processor._get_preprocess_shape((height, width), 1024))
    points = np.array([[[0.0, 0.0], [width - 1, height - 1], [width / 3, height / 7]]])
    expected = processor._normalize_coordinates(1024, points[0], (height, width))
    np.testing.assert_allclose(to_model_coordinates(points, (height, width), resized)[0], expected)
