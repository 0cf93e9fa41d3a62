"""Property-based tests: any input to prompt parsing or picture decoding either parses or raises our error."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from segmentation import InvalidImageError, InvalidPromptError
from segmentation.images import load_image
from segmentation.masks import decode_png, encode_png, object_stats, resize_nearest
from segmentation.prompts import parse_prompt, resized_shape, to_model_coordinates

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.just(10**400),  # too large for a float
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=3),
)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4), max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(points=json_values, labels=st.one_of(st.none(), json_values), boxes=st.one_of(st.none(), json_values))
def test_any_json_prompt_parses_or_raises_invalid_prompt(points, labels, boxes):
    try:
        prompt = parse_prompt(points, labels, boxes, width=50, height=40)
    except InvalidPromptError as error:
        assert error.message and error.param in ("segment_prompt", "point_labels", "box_prompt")
        return
    for obj in prompt.objects:
        assert obj.points or obj.box is not None
        assert len(obj.points) == len(obj.labels)
        for (x, y), label in zip(obj.points, obj.labels):
            assert 0 <= x < 50 and 0 <= y < 40 and math.isfinite(x) and label in (0, 1)
        if obj.box is not None:
            x0, y0, x1, y1 = obj.box
            assert 0 <= x0 < x1 <= 50 and 0 <= y0 < y1 <= 40


@settings(max_examples=200, deadline=None)
@given(
    objects=st.lists(
        st.tuples(
            st.lists(st.tuples(st.integers(0, 49), st.integers(0, 39)), max_size=3),
            st.one_of(
                st.none(), st.tuples(st.integers(0, 24), st.integers(0, 19), st.integers(25, 50), st.integers(20, 40))
            ),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_layout_groups_partition_the_objects_by_token_layout(objects):
    objects = [(pts, box) for pts, box in objects if pts or box is not None] or [([(1, 1)], None)]
    prompt = parse_prompt(
        [[list(p) for p in pts] for pts, _ in objects], None, [b for _, b in objects], width=50, height=40
    )
    groups = prompt.layout_groups()
    assert sorted(i for g in groups for i in g) == list(range(len(objects)))
    for group in groups:
        assert len({prompt.objects[i].layout for i in group}) == 1 and group == sorted(group)
    assert len({prompt.objects[g[0]].layout for g in groups}) == len(groups)


@settings(max_examples=200, deadline=None)
@given(
    width=st.integers(1, 4000),
    height=st.integers(1, 4000),
    fx=st.floats(0, 1, exclude_max=True),
    fy=st.floats(0, 1, exclude_max=True),
)
def test_valid_points_land_inside_the_model_frame(width, height, fx, fy):
    point = [fx * width, fy * height]
    prompt = parse_prompt([[point]], width=width, height=height)
    resized = resized_shape(height, width)
    assert max(resized) == 1024
    mapped = to_model_coordinates(np.array([[prompt.objects[0].points[0]]]), (height, width), resized)[0, 0]
    assert 0 <= mapped[0] <= resized[1] and 0 <= mapped[1] <= resized[0]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=2048))
def test_arbitrary_bytes_decode_or_raise_invalid_image(data):
    try:
        rgb = load_image(data, max_pixels=1_000_000)
    except InvalidImageError as error:
        assert error.message
        return
    assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype == np.uint8


@settings(max_examples=60, deadline=None)
@given(
    width=st.integers(1, 64),
    height=st.integers(1, 64),
    cut=st.floats(0.05, 0.95),
    fmt=st.sampled_from(["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"]),
)
def test_truncated_pictures_never_escape_as_other_errors(width, height, cut, fmt):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(width * height).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(
        buffer, format=fmt
    )
    data = buffer.getvalue()
    data = data[: max(1, int(len(data) * cut))]
    try:
        rgb = load_image(data)
    except InvalidImageError:
        return
    assert rgb.shape == (height, width, 3)


@settings(max_examples=100, deadline=None)
@given(
    labels=st.integers(1, 300).flatmap(
        lambda n: st.tuples(st.just(n), st.integers(1, 40), st.integers(1, 40), st.integers(0, 2**31))
    ),
    out_w=st.integers(1, 80),
    out_h=st.integers(1, 80),
)
def test_png_round_trip_and_nearest_resize_keep_values_categorical(labels, out_w, out_h):
    n, w, h, seed = labels
    dtype = np.uint8 if n <= 255 else np.uint16
    label_map = np.random.default_rng(seed).integers(0, n + 1, size=(h, w)).astype(dtype)
    np.testing.assert_array_equal(decode_png(encode_png(label_map)), label_map)
    resized = resize_nearest(label_map, out_w, out_h)
    assert resized.shape == (out_h, out_w) and resized.dtype == dtype
    assert set(np.unique(resized)) <= set(np.unique(label_map))


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 40),  # both ways of finding boxes: a scan per object (few objects) and one table pass
    shape=st.tuples(st.integers(1, 30), st.integers(1, 30)),
    seed=st.integers(0, 2**31),
    sparsity=st.integers(0, 4),
)
def test_object_stats_equal_a_brute_force_count(n, shape, seed, sparsity):
    rng = np.random.default_rng(seed)
    label_map = rng.integers(0, n + 1, size=shape)
    label_map[rng.integers(0, 5, size=shape) < sparsity] = 0  # some objects end up with no pixel
    label_map = label_map.astype(np.uint8 if n <= 255 else np.uint16)
    stats = object_stats(label_map, n)
    assert [s.value for s in stats] == list(range(1, n + 1))
    for s in stats:
        ys, xs = np.nonzero(label_map == s.value)
        assert s.area == len(xs)
        assert s.bbox == ((xs.min(), ys.min(), xs.max(), ys.max()) if len(xs) else None)


def test_png_is_a_plain_grayscale_png_that_other_decoders_read():
    label_map = np.zeros((37, 53), dtype=np.uint8)
    label_map[5:20, 10:40] = 1
    label_map[25:, :7] = 2
    image = Image.open(io.BytesIO(encode_png(label_map)))
    image.verify()  # checks every chunk's CRC
    image = Image.open(io.BytesIO(encode_png(label_map)))
    assert (image.format, image.mode, image.size) == ("PNG", "L", (53, 37))
    np.testing.assert_array_equal(np.asarray(image), label_map)
    wide = label_map.astype(np.uint16) * 300
    assert Image.open(io.BytesIO(encode_png(wide))).mode.startswith("I")
    np.testing.assert_array_equal(decode_png(encode_png(wide)), wide)
    for bad in (label_map.astype(np.int32), np.zeros((0, 4), np.uint8), np.zeros((2, 2, 2), np.uint8)):
        with pytest.raises(ValueError):
            encode_png(bad)
