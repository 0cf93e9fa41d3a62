"""Picture decoding: every mode to upright RGB, limits before decoding, clear errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import make_picture
from PIL import Image

from segmentation import ImageTooLargeError, InvalidImageError
from segmentation.images import load_image, pixel_hash


def _encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def test_exif_orientation_is_applied_so_coordinates_refer_to_the_upright_picture(segmenter):
    upright = make_picture(120, 80)
    # stored rotated; EXIF orientation 6 says "rotate 90° clockwise to display"
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
    assert stored.size == (80, 120)
    exif = Image.Exif()
    exif[0x0112] = 6
    np.testing.assert_array_equal(load_image(_encode(stored, "PNG", exif=exif.tobytes())), upright)
    jpeg = _encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    assert load_image(jpeg).shape == (80, 120, 3)
    result = segmenter.segment(segmenter.embed(jpeg), [[[110, 10]]])  # x=110 exists only upright
    assert result.best.labels.shape == (80, 120)


@pytest.mark.parametrize(
    "mode",
    ["RGBA", "LA", "L", "1", "P", "CMYK", "I;16", "I", "F", "RGB"],
)
def test_every_mode_becomes_rgb(mode):
    base = Image.fromarray(make_picture(64, 48))
    image = base.convert("L").convert(mode) if mode in ("I;16", "I", "F", "1") else base.convert(mode)
    if mode == "I;16":
        image = Image.fromarray((np.asarray(base.convert("L"), dtype=np.uint16) * 257), "I;16")
    fmt = {"CMYK": "JPEG", "F": "TIFF", "I": "TIFF"}.get(mode, "PNG")
    decoded = load_image(_encode(image, fmt))
    assert decoded.shape == (48, 64, 3) and decoded.dtype == np.uint8
    if mode in ("L", "I;16", "I"):
        gray = np.asarray(base.convert("L"))
        assert np.abs(decoded[..., 0].astype(int) - gray).max() <= 1
        assert (decoded[..., 0] == decoded[..., 1]).all()


def test_transparent_pixels_are_flattened_on_white():
    rgba = np.zeros((10, 10, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red, fully transparent
    decoded = load_image(_encode(Image.fromarray(rgba, "RGBA")))
    assert (decoded == 255).all()


def test_palette_with_transparency_and_webp():
    image = Image.fromarray(make_picture(40, 30)).convert("P")
    image.info["transparency"] = 0
    assert load_image(_encode(image)).shape == (30, 40, 3)
    assert load_image(_encode(Image.fromarray(make_picture(40, 30)), "WEBP")).shape == (30, 40, 3)


def test_arrays_paths_and_pil_images(tmp_path):
    picture = make_picture(32, 24)
    path = tmp_path / "p.png"
    Image.fromarray(picture).save(path)
    for source in (picture, str(path), path, Image.open(path), picture.astype(np.float32) / 255.0, picture[..., 0]):
        decoded = load_image(source)
        assert decoded.shape == (24, 32, 3)
    np.testing.assert_array_equal(load_image(str(path)), picture)


@pytest.mark.parametrize(
    "source, message",
    [
        (b"definitely not a picture", "not a picture"),
        (b"", "not a picture"),
        (np.zeros((4, 4, 5), dtype=np.uint8), "HxW"),
        (np.zeros((4, 4), dtype=np.int64), "dtype"),
        (np.full((4, 4), np.nan, dtype=np.float32), "NaN"),
        (12345, "Unsupported picture type"),
    ],
)
def test_bad_pictures_raise_a_clear_error(source, message):
    with pytest.raises(InvalidImageError, match=message):
        load_image(source)


def test_truncated_picture_is_rejected():
    data = _encode(Image.fromarray(make_picture(200, 200)), "JPEG")
    with pytest.raises(InvalidImageError, match="damaged or truncated"):
        load_image(data[: len(data) // 2])


def test_decompression_bomb_is_rejected_before_decoding():
    # a 30000x30000 bilevel PNG is a few KB on disk and 900 megapixels decoded
    bomb = _encode(Image.new("1", (30000, 30000)), "PNG", optimize=True)
    assert len(bomb) < 200_000
    with pytest.raises(ImageTooLargeError, match="megapixel limit"):
        load_image(bomb)
    from PIL import Image as PILImage

    assert PILImage.MAX_IMAGE_PIXELS is not None, "Pillow's own bomb guard must stay on for other code"
    with pytest.raises(ImageTooLargeError):
        load_image(_encode(Image.new("RGB", (300, 200))), max_pixels=50_000)


def test_pixel_hash_depends_on_pixels_not_encoding():
    picture = make_picture(50, 40)
    png = load_image(_encode(Image.fromarray(picture), "PNG"))
    assert pixel_hash(png) == pixel_hash(picture)
    other = picture.copy()
    other[0, 0, 0] ^= 1
    assert pixel_hash(other) != pixel_hash(picture)
    assert pixel_hash(picture.reshape(40, 50, 3)) != pixel_hash(np.ascontiguousarray(picture.reshape(50, 40, 3)))
