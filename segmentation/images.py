"""Turning whatever a caller hands us into the upright RGB picture a person sees.

Coordinates refer to that picture, so EXIF orientation is applied before anything else,
and the pixel limit and the shape rule (`limits.check_picture_shape`) are checked from the header,
before the pixels are decoded.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ImageTooLargeError, InvalidImageError, UnsupportedImageFormatError
from .limits import check_picture_shape

ImageInput = bytes | bytearray | memoryview | str | Path | Image.Image | np.ndarray

DEFAULT_MAX_PIXELS = 40_000_000
# The formats the README lists, decoded by Pillow itself. Nothing else is even identified: no
# EPS/PostScript (Pillow runs Ghostscript for it), no format that runs an external program.
# (A camera's multi-picture JPEG is opened by the JPEG plugin, as Pillow's MPO.)
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
FORMATS_TEXT = "JPEG, PNG, WebP, BMP, TIFF or GIF"
# EXIF orientations 5-8 turn the picture a quarter: its upright width is the stored height.
_QUARTER_TURNS = (5, 6, 7, 8)


def _check_size(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise InvalidImageError(f"The picture has no pixels ({width}x{height}).", param="image")
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"The picture is {width}x{height} = {width * height / 1e6:.1f} megapixels; "
            f"the limit is {max_pixels / 1e6:g} megapixels. Scale it down and try again.",
            param="image",
        )
    check_picture_shape(width, height)


def _open(source: bytes | str | Path) -> Image.Image:
    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(stream, formats=FORMATS)
    except Image.DecompressionBombError as error:
        # Pillow's own guard (2 × Image.MAX_IMAGE_PIXELS) fired while reading the header
        raise ImageTooLargeError(
            f"The picture is far larger than the {DEFAULT_MAX_PIXELS / 1e6:g}-megapixel limit ({error}). "
            "Scale it down and try again.",
            param="image",
        ) from error
    except UnidentifiedImageError as error:
        if _identified_elsewhere(source):
            raise UnsupportedImageFormatError(
                f"This picture format is not accepted: send a {FORMATS_TEXT} picture.", param="image"
            ) from error
        raise InvalidImageError(
            f"The data is not a picture in a format we read ({FORMATS_TEXT}).", param="image"
        ) from error
    except FileNotFoundError as error:
        raise InvalidImageError(f"No picture file at {str(source)!r}.", param="image") from error
    except (OSError, ValueError, SyntaxError) as error:
        raise InvalidImageError(f"The picture could not be read: {error}.", param="image") from error


def _identified_elsewhere(source: bytes | str | Path) -> bool:
    """Whether the data is a picture in a format we refuse (only the plugins' cheap header tests run)."""
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            head = bytes(source[:64])
        else:
            with open(source, "rb") as file:
                head = file.read(64)
    except OSError:
        return False
    Image.init()
    for name, (_, accept) in Image.OPEN.items():
        try:
            if name not in FORMATS and accept is not None and accept(head):
                return True
        except Exception:  # a plugin's header test that cannot read this short a header
            continue
    return False


def upright_size(source: ImageInput, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) of the upright picture, read from the header alone (nothing is decoded),
    with the pixel limit checked: what a prompt is validated against before the encoder runs."""
    if isinstance(source, np.ndarray):
        width, height = (source.shape[1], source.shape[0]) if source.ndim >= 2 else (0, 0)
    else:
        if isinstance(source, Image.Image):
            image = source
        elif isinstance(source, (bytes, bytearray, memoryview, str, Path)):
            image = _open(source)
        else:
            raise InvalidImageError(f"Unsupported picture type {type(source).__name__}.", param="image")
        width, height = image.size
        try:
            orientation = image.getexif().get(0x0112)
        except Exception:  # a damaged EXIF block: decoding will say what is wrong, if anything
            orientation = None
        if orientation in _QUARTER_TURNS:
            width, height = height, width
    _check_size(width, height, max_pixels)
    return width, height


# rows per strip when a wide mode is brought to 8 bits: ~1-4 MB of numpy at a time, whatever the picture
_STRIP_PIXELS = 1 << 20
_WIDE_INT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# EXIF orientation -> the transpose that makes the picture upright (as ImageOps.exif_transpose)
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _strips(image: Image.Image):
    """(top, numpy strip) over the picture in its own mode: a few MB at a time, never a whole wide copy."""
    width, height = image.size
    rows = max(1, _STRIP_PIXELS // max(1, width))
    for top in range(0, height, rows):
        yield top, np.asarray(image.crop((0, top, width, min(height, top + rows))))


def _wide_to_l(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float pictures to 8-bit grey, in strips (a 40-megapixel float TIFF
    of a few hundred KB would otherwise take over a GiB as float64)."""
    low, high = np.inf, -np.inf
    for _, strip in _strips(image):
        if image.mode == "F":
            finite = strip[np.isfinite(strip)]
            if finite.size:
                low, high = min(low, float(finite.min())), max(high, float(finite.max()))
        else:
            high = max(high, float(strip.max(initial=0)))
    grey = Image.new("L", image.size)
    if image.mode == "F":
        low = 0.0 if not np.isfinite(low) else low
        span = (high - low) if np.isfinite(high) and high > low else 1.0
        for top, strip in _strips(image):
            clean = np.nan_to_num(strip.astype(np.float32), nan=low, posinf=low + span, neginf=low)
            values = np.clip((clean - low) * (255.0 / span), 0, 255).round().astype(np.uint8)
            grey.paste(Image.fromarray(values, "L"), (0, top))
        return grey
    # I;16 is 16-bit by definition; a plain 32-bit "I" may hold 8-bit, 16-bit or wider values.
    if image.mode.startswith("I;16") or 255 < high <= 65535:
        scale = 257.0
    else:
        scale = max(1.0, high / 255.0)
    for top, strip in _strips(image):
        values = np.clip(strip.astype(np.float32) / scale, 0, 255).round().astype(np.uint8)
        grey.paste(Image.fromarray(values, "L"), (0, top))
    return grey


def _to_rgb(image: Image.Image) -> Image.Image:
    """Every mode to 8-bit RGB; transparency is flattened onto white, as a viewer shows it."""
    if image.mode in _WIDE_INT_MODES or image.mode == "F":
        image = _wide_to_l(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB") if image.mode != "RGB" else image


def _from_array(array: np.ndarray, max_pixels: int) -> np.ndarray:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise InvalidImageError(
            f"An array picture must be HxW, HxWx3 or HxWx4; got shape {tuple(array.shape)}.", param="image"
        )
    _check_size(array.shape[1], array.shape[0], max_pixels)
    if array.dtype == np.uint8:
        pass
    elif array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise InvalidImageError("An array picture contains NaN or infinite values.", param="image")
        array = np.clip(array * 255.0 if array.max(initial=0) <= 1.0 else array, 0, 255).round().astype(np.uint8)
    elif array.dtype == np.uint16:
        array = (array.astype(np.float64) / 257.0).round().astype(np.uint8)
    else:
        raise InvalidImageError(f"Unsupported array dtype {array.dtype}; use uint8, uint16 or float.", param="image")
    return np.asarray(_to_rgb(Image.fromarray(np.ascontiguousarray(array))))


def load_rgb(source: ImageInput, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The upright 8-bit RGB picture as a PIL image (no numpy copy): what downloads build on in strips.

    Decoded in the picture's own mode, brought to 8 bits in strips, and turned upright last, on the
    8-bit picture (the memory of a page request stays within a few bytes a pixel)."""
    if isinstance(source, np.ndarray):
        return Image.fromarray(_from_array(source, max_pixels))
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, (bytes, bytearray, memoryview, str, Path)):
        image = _open(source)
    else:
        raise InvalidImageError(
            f"Unsupported picture type {type(source).__name__}; pass bytes, a path, a PIL image or a numpy array.",
            param="image",
        )
    _check_size(*image.size, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                orientation = image.getexif().get(0x0112)
            except Exception:  # a damaged EXIF block: the picture as stored
                orientation = None
            image.load()
            rgb = _to_rgb(image)
            if orientation in _UPRIGHT:
                rgb = rgb.transpose(_UPRIGHT[orientation])
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        raise InvalidImageError(
            f"The picture is damaged or truncated and could not be decoded ({error}).", param="image"
        ) from error
    return rgb


def load_image(source: ImageInput, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An upright HxWx3 uint8 RGB array from bytes, a path, a PIL image or an array."""
    if isinstance(source, np.ndarray):
        return _from_array(source, max_pixels)
    rgb = load_rgb(source, max_pixels)
    array = np.asarray(rgb, dtype=np.uint8)
    del rgb
    return np.ascontiguousarray(array)


def encoded_digest(image: object) -> str | None:
    """A digest of a picture's encoded bytes (None for other inputs): cheap next to decoding
    and hashing the pixels, and the same bytes always decode to the same pixels."""
    if not isinstance(image, (bytes, bytearray, memoryview)):
        return None
    return "encoded:" + hashlib.blake2b(image, digest_size=16).hexdigest()


def pixel_hash(rgb: np.ndarray) -> str:
    """A digest of the decoded pixels: the same picture from any source shares one cache entry."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(np.asarray(rgb.shape, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(rgb).data)
    return digest.hexdigest()
