"""The HTTP wire contract (pydantic v2), shared by the server, our client and /openapi.json.

Field names and types follow the AI Refinery SDK's `images.segment()` models
(`SegmentationResponse`, `Mask`, `Usage`), so that SDK parses our answers unmodified; the
extra `segments` on each mask are ignored by it and read by our client. No torch here: the
client imports this module.
"""

from __future__ import annotations

import base64
import io
import time
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, model_validator

from .limits import MAX_COORDINATE, MAX_USER_CHARS

# Bounded: a coordinate past any picture side is refused here (422), and no integer overflows a float.
Coordinate = (
    Annotated[StrictFloat, Field(ge=-MAX_COORDINATE, le=MAX_COORDINATE)]
    | Annotated[StrictInt, Field(ge=-MAX_COORDINATE, le=MAX_COORDINATE)]
)


class SegmentationRequest(BaseModel):
    """Body of `POST /v1/images/segmentations` as the SDK sends it, plus our own parameters.

    The SDK spreads its keyword arguments into the body and nests `extra_body`; both are accepted
    (`extra_body` keys override top-level ones). Unknown keys are ignored.
    """

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str = Field(description="A served model id, e.g. syscv-community/sam-hq-vit-base (see GET /v1/models).")
    image_prompt: str = Field(
        description="The picture, base64-encoded (JPEG, PNG, WebP, BMP, TIFF or GIF); a data:image/...;base64, prefix is accepted."
    )
    segment_prompt: list[list[list[Coordinate]]] = Field(
        description="Objects → points → [x, y] in pixels of the upright picture, e.g. [[[120, 80]], [[300, 200], [340, 260]]]."
    )
    point_labels: list[list[StrictInt]] | None = Field(
        default=None, description="Same nesting as the points: 1 include, 0 exclude. Default: all 1."
    )
    box_prompt: list[list[Coordinate] | None] | None = Field(
        default=None,
        description="One box [x0, y0, x1, y1] (pixels) or null per object of segment_prompt; "
        "an object with a box may have an empty point list.",
    )
    n: StrictInt = Field(default=1, description="How many candidate label maps to return, best first (1-3).")
    size: str | None = Field(
        default=None,
        description="WIDTHxHEIGHT: return the masks at this size (nearest neighbour, values stay categorical).",
    )
    hq_token_only: StrictBool = Field(default=False, description="SAM-HQ: use the HQ output token alone.")
    user: str | None = Field(
        default=None,
        max_length=MAX_USER_CHARS,
        description="An end-user id; recorded in the logs only (shortened and escaped).",
    )
    segment_everything: bool | dict[str, Any] | None = Field(
        default=None,
        description="Find every object instead of segmenting a prompt (official SAM-HQ's automatic mask "
        "generator): true for the defaults, or an object with any of points_per_side (32), points_per_batch (64), "
        "pred_iou_thresh (0.88), stability_score_thresh (0.95), stability_score_offset (1.0), box_nms_thresh (0.7), "
        "min_mask_region_area (0; > 0 fills smaller holes and removes smaller islands of each mask, as official). "
        "segment_prompt is then empty or left out; the answer is one label map, one segment per object found.",
    )
    extra_body: dict[str, Any] | None = Field(default=None, description="Further parameters, merged into the body.")

    @model_validator(mode="before")
    @classmethod
    def _merge_extra_body(cls, data: Any) -> Any:
        data = merge_extra_body(data)
        if (
            isinstance(data, dict)
            and data.get("segment_everything") not in (None, False)
            and "segment_prompt" not in data
        ):
            data = {**data, "segment_prompt": []}  # "everything" needs no prompt
        return data


def merge_extra_body(data: Any) -> Any:
    """The body with `extra_body`'s keys merged in (they win), as the SDK means it."""
    if isinstance(data, dict) and isinstance(data.get("extra_body"), dict):
        return {**data, **data["extra_body"]}
    return data


class Segment(BaseModel):
    """One object in a label map."""

    value: int = Field(description="The object's pixel value (its 1-based position in segment_prompt).")
    score: float = Field(description="Predicted IoU of the object's mask.")
    area: int = Field(description="Pixels carrying this value.")
    bbox: list[int] | None = Field(description="[x0, y0, x1, y1], inclusive; null when the object got no pixel.")
    point: list[float] | None = Field(
        default=None,
        exclude_if=lambda value: value is None,  # absent from prompt answers: their wire format is unchanged
        description="segment_everything only: the grid point [x, y] (picture pixels) whose mask this is; a "
        "prompt of that one point (label 1, n=1) gives the same mask, to refine it with more points or a box.",
    )


def decode_mask_png(b64_png: str) -> np.ndarray:
    """A base64 label-map PNG → H×W uint8 (uint16 beyond 255 objects) numpy array."""
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(b64_png)))
    if image.mode == "L":
        return np.asarray(image, dtype=np.uint8)
    return np.asarray(image).astype(np.uint16)


class Mask(BaseModel):
    """One candidate label map: PNG pixel value k = k-th object, 0 = background."""

    b64_json: str | None = Field(
        default=None, description="Base64 PNG of the label map (8-bit, or 16-bit beyond 255 objects)."
    )
    label: str | None = Field(default=None, description="Semantic label; SAM is class-agnostic, so null.")
    score: float | None = Field(default=None, description="Mean predicted IoU of the map's objects.")
    segments: list[Segment] = Field(default_factory=list, description="Per-object score, area and box.")

    def to_array(self) -> np.ndarray:
        """The label map as a numpy array."""
        if self.b64_json is None:
            raise ValueError("this mask carries no image data")
        return decode_mask_png(self.b64_json)


class InputTokensDetails(BaseModel):
    image_tokens: int = Field(description="Cells of the image-embedding grid (64×64).")
    cached_tokens: int = Field(description="Image tokens served from the embedding cache (0 when the encoder ran).")
    point_tokens: int = Field(description="Prompt tokens: one per point, two per box (its corners).")


class Usage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int = Field(description="Masks returned.")
    total_tokens: int


class SegmentationResponse(BaseModel):
    """The answer of `POST /v1/images/segmentations` (same fields as the SDK's model)."""

    created: int = Field(description="Unix seconds.")
    data: list[Mask]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    family: str | None = None
    status: str | None = Field(default=None, description="loaded, not loaded yet, or why it is unavailable.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ValidateResponse(BaseModel):
    message: str
    organization_id: str


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def build_response(result: Any, created: int | None = None) -> SegmentationResponse:
    """The API answer for a `service.SegmentResult` (duck-typed: no torch import here).

    The UI's "response JSON" export uses it too, so both are the same document.
    """
    data = [
        Mask(
            b64_json=base64.b64encode(png).decode("ascii"),
            label=None,
            score=candidate.score,
            segments=[
                Segment(
                    value=o.value,
                    score=o.score,
                    area=o.area,
                    bbox=list(o.bbox) if o.bbox else None,
                    point=list(o.point) if getattr(o, "point", None) is not None else None,
                )
                for o in candidate.objects
            ],
        )
        for candidate, png in zip(result.candidates, result.pngs())
    ]
    input_tokens = result.image_tokens + result.point_tokens
    usage = Usage(
        input_tokens=input_tokens,
        input_tokens_details=InputTokensDetails(
            image_tokens=result.image_tokens,
            cached_tokens=result.image_tokens if result.embedding_cached else 0,
            point_tokens=result.point_tokens,
        ),
        output_tokens=len(data),
        total_tokens=input_tokens + len(data),
    )
    return SegmentationResponse(created=int(time.time()) if created is None else created, data=data, usage=usage)
