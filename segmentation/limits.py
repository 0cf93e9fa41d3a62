"""What one request may cost: the one place that says it, and every way in is held to it.

The HTTP API (its router, so every deployment that reuses it), Gradio's `/segment` and anything
else that calls `service.segment` pass through these checks, and the ASGI guard
(`segmentation.guard`) takes its body caps from here. What a request costs:

* its body: `max_body_bytes` on every route (the page's and Gradio's too), arriving with no pause
  longer than `body_timeout` seconds and whole within `body_deadline` seconds;
* its picture's file: `max_picture_bytes`, the same for the API's base64 and the page's upload (the
  most a base64 body under the cap can carry, so a picture the page opens the API opens too);
* its picture: `max_pixels`, read from the header before anything is decoded, and its shape
  (`check_picture_shape`: at most `MAX_ASPECT` times as long as it is wide, so the model sees it);
* its prompt: `max_objects` objects of at most `max_points` points, `max_candidates` label maps;
* its output: `size` within `max_pixels`;
* its work: objects × candidates × megapixels of the picture (the label maps are composed at the
  picture's size, one object at a time; `size` then only resizes them) within `max_work_mp`;
* "segment everything": grid points × megapixels of the picture within `max_work_mp` (each point's
  mask may be upscaled to the picture's size), checked before the picture is decoded;
* its `user` field: at most `MAX_USER_CHARS` characters, logged shortened and escaped.

No torch here: the wire schema (`schemas`, imported by the client) uses the constants.
"""

from __future__ import annotations

from collections.abc import Sized
from dataclasses import dataclass
from typing import Any

from .errors import ImageTooLargeError, InvalidImageError, InvalidPromptError, RequestLimitError
from .prompts import Prompt, parse_prompt

MiB = 1024 * 1024
# what a segmentation body carries besides its picture's base64 (prompt, options; at most an eighth of
# the cap): the picture gets the rest
PROMPT_ALLOWANCE = 1 * MiB
MAX_CANDIDATES = 3
MAX_USER_CHARS = 256  # the schema refuses a longer `user` (422)
USER_LOG_CHARS = 64  # and the log shows at most this much of it, escaped
# |x|, |y| in the wire schema: far beyond any picture side, and small enough that no coordinate
# overflows a float (a 401-digit integer is a 422, not a 500).
MAX_COORDINATE = 2**31
# The model scales a picture's long side to MODEL_SIDE pixels and reads it in PATCH-pixel squares; a short
# side that keeps less than one patch is (nearly) nothing to the model, and below half a pixel the image
# processor fails outright (a 40000000x1 picture was a 500). So the long side is at most MAX_ASPECT times
# the short one: a 64x1 picture becomes 1024x16, one row of patches. (A tiny square picture, 1x1, is fine.)
MODEL_SIDE = 1024
PATCH = 16
MAX_ASPECT = MODEL_SIDE // PATCH


def check_picture_shape(width: int, height: int) -> None:
    """One rule for a picture's shape from every way in, read from the header before decoding
    (`segmentation.images` calls it wherever it checks the pixel limit)."""
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise InvalidImageError(
            f"The picture is {width}×{height}: too thin for the model (it scales the long side to {MODEL_SIDE} "
            f"pixels, and the short side must keep at least {PATCH} of them, so the long side may be at most "
            f"{MAX_ASPECT} times the short one). Crop it or add a border and try again.",
            param="image",
            code="picture_too_thin",
        )


@dataclass(frozen=True)
class Limits:
    max_pixels: int = 40_000_000
    max_objects: int = 255
    max_points: int = 64
    max_candidates: int = MAX_CANDIDATES
    max_work_mp: int = 1000
    max_body_bytes: int = 32 * MiB
    max_user_chars: int = MAX_USER_CHARS
    body_timeout: float = 20.0
    body_deadline: float = 120.0
    bodies_bytes: int = 512 * MiB  # request body bytes in flight for all clients together (the guard's bound)

    @property
    def max_picture_bytes(self) -> int:
        """A picture file's bytes: what base64 can carry in a body under the cap, less the prompt's allowance."""
        return (self.max_body_bytes - min(PROMPT_ALLOWANCE, self.max_body_bytes // 8)) * 3 // 4

    @classmethod
    def from_settings(cls, settings: Any) -> Limits:
        return cls(
            max_pixels=settings.max_pixels,
            max_objects=settings.max_objects,
            max_points=settings.max_points,
            max_work_mp=settings.max_work_mp,
            max_body_bytes=settings.max_body_mb * MiB,
            body_timeout=settings.body_timeout,
            body_deadline=settings.body_deadline,
            bodies_bytes=settings.bodies_mb * MiB,
        )

    # ---- the parts of a request ------------------------------------------------------------

    def check_picture_bytes(self, count: int) -> None:
        """One rule for a picture file from every way in (API base64, page upload, Gradio)."""
        if count > self.max_picture_bytes:
            raise ImageTooLargeError(
                f"The picture file is {count / MiB:.1f} MiB; the limit is {self.max_picture_bytes / MiB:.1f} MiB. "
                "Save it smaller (JPEG, or fewer pixels) and try again.",
                param="image",
                code="file_too_large",
            )

    def check_candidates(self, n: Any) -> int:
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.max_candidates:
            raise RequestLimitError(
                f"n must be from 1 to {self.max_candidates}, got {n!r}.", param="n", code="invalid_n"
            )
        return n

    def check_size(self, size: tuple[int, int] | None) -> None:
        """The requested output size: within the picture limit, like a picture."""
        if size is None:
            return
        width, height = size
        if width * height > self.max_pixels:
            raise RequestLimitError(
                f"size {width}x{height} is {width * height / 1e6:.1f} megapixels; the limit is "
                f"{self.max_pixels / 1e6:g} megapixels.",
                param="size",
                code="invalid_size",
            )

    def check_object_count(self, count: int) -> None:
        if count > self.max_objects:
            raise InvalidPromptError(
                f"The prompt has {count} objects; the limit is {self.max_objects}.", param="segment_prompt"
            )

    def check_point_count(self, index: int, count: int) -> None:
        if count > self.max_points:
            raise InvalidPromptError(
                f"object {index + 1} has {count} points; the limit is {self.max_points}.", param="segment_prompt"
            )

    def check_prompt(
        self,
        points: Any,
        labels: Any,
        boxes: Any,
        width: int,
        height: int,
        candidates: int = 1,
        work_size: tuple[int, int] | None = None,
    ) -> Prompt:
        """The prompt parsed within the object and point limits, its coordinates inside a `width` × `height`
        picture, and its work (objects × `candidates` maps at `work_size`, default the picture's) within
        `max_work_mp`: what every way in (the API, the page, a page in front of a remote API) asks first."""
        prompt = parse_prompt(
            points, labels, boxes, width=width, height=height, max_objects=self.max_objects, max_points=self.max_points
        )
        self.check_work(len(prompt), candidates, *(work_size or (width, height)))
        return prompt

    def check_work(self, objects: int, candidates: int, width: int, height: int) -> None:
        """Composing label maps costs objects × candidates × picture pixels (time; memory is bounded per object)."""
        work = objects * candidates * width * height / 1e6
        if work > self.max_work_mp:
            raise RequestLimitError(
                f"This request asks for {objects} objects × {candidates} candidate maps on a "
                f"{width}x{height} picture = {work:.0f} object-megapixels; the limit is {self.max_work_mp}. "
                "Send fewer objects, a smaller n, or a smaller picture.",
                param="segment_prompt",
                code="too_much_work",
            )

    def check_everything_work(self, grid_points: int, width: int, height: int) -> None:
        """ "Segment everything" may upscale every grid point's mask to the picture's size (its stability score
        and box): it costs grid points × picture megapixels, counted like objects."""
        work = grid_points * width * height / 1e6
        if work > self.max_work_mp:
            raise RequestLimitError(
                f"Segmenting everything with {grid_points} grid points on a {width}x{height} picture is "
                f"{work:.0f} point-megapixels; the limit is {self.max_work_mp}. Use a smaller points_per_side "
                "or a smaller picture.",
                param="segment_everything.points_per_side",
                code="too_much_work",
            )

    # ---- the whole request -----------------------------------------------------------------

    def check(
        self,
        *,
        points: Any,
        candidates: Any,
        size: tuple[int, int] | None = None,
        picture_size: tuple[int, int] | None = None,
    ) -> None:
        """Everything that can be checked before the picture is decoded (`picture_size`: from its header)."""
        self.check_candidates(candidates)
        self.check_size(size)
        if not isinstance(points, Sized) or isinstance(points, (str, bytes)):
            return  # not a prompt at all: prompt validation says what is wrong with it
        self.check_object_count(len(points))
        for index, obj in enumerate(points):
            if isinstance(obj, Sized) and not isinstance(obj, (str, bytes)):
                self.check_point_count(index, len(obj))
        if picture_size is not None:
            self.check_work(len(points), candidates, *picture_size)


def loggable_user(user: str) -> str:
    """`user` as the log shows it: at most USER_LOG_CHARS characters, control characters escaped."""
    shown = repr(user[:USER_LOG_CHARS])
    return shown + (f"… ({len(user)} characters)" if len(user) > USER_LOG_CHARS else "")
