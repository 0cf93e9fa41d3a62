"""Several pictures in one session: where each picture's files live, and its result kept on disk.

Each picture of a session (`ui.state.Slot`) has a folder `pictures/<id>/` in the session folder with its
preview JPEG, a small thumbnail for the strip and, once it has objects, its result: `labels.png` (the
full-size label map, value = the object's visible number, 0 = background) and `result.json` (the objects:
number, category, score; the prompt's signature). The result is written when the person moves to another
picture and before an export, only when the prompt changed since it was last written (`persist`), so a
whole-session export reads 200 small files instead of decoding 200 pictures again (whose embeddings are long
gone from the cache). Everything here counts in the session's disk budget: it is in the session folder.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from segmentation.masks import encode_png

from . import state as st

THUMB_SIDE = 96


@dataclass(frozen=True)
class WorkflowOptions:
    """The labeling workflow's bounds (README settings table; `ui.page.page_options` reads them)."""

    pictures_per_session: int = 500  # SAMHQ_UI_PICTURES_PER_SESSION
    export_bytes: int = 1024 * 2**20  # SAMHQ_UI_EXPORT_MB: one export's zip
    export_seconds: float = 300.0  # SAMHQ_UI_EXPORT_SECONDS: one export, results and zip together
    export_send_timeout: float = 60.0  # a download whose client takes no chunk (256 KB) for this long is ended


@dataclass(frozen=True)
class NumberedObject:
    """An object of a label map whose value is the object's visible number (as the engine's segment records)."""

    value: int
    score: float
    area: int
    bbox: tuple | None


def folder(entry_folder: Path, slot_id: int) -> Path:
    return entry_folder / "pictures" / str(slot_id)


def renumber(labels: np.ndarray, numbers: list[int]) -> np.ndarray:
    """A label map whose values are 1..n in prompt order → values = the objects' visible numbers (`numbers[i]`
    for value i + 1): "Object 2" stays value 2 when Object 1 is empty or deleted. 8-bit while the numbers fit,
    else 16-bit (as the API's maps past 255 objects)."""
    top = max(numbers, default=0)
    dtype = np.uint8 if top <= 255 else np.uint16
    if top > np.iinfo(np.uint16).max:
        raise ValueError("Object numbers past 65535 cannot be written into a label map: start a new session.")
    if list(numbers) == list(range(1, len(numbers) + 1)) and labels.dtype == dtype:
        return labels  # no gap: the map is already numbered
    lut = np.zeros(max(int(labels.max(initial=0)), len(numbers)) + 1, dtype=dtype)
    lut[1 : len(numbers) + 1] = numbers
    return lut[labels]


def numbered_objects(objects: tuple[Any, ...], numbers: list[int]) -> list[NumberedObject]:
    """The engine's per-object records (value 1..n in prompt order) with value = the visible number."""
    return [
        NumberedObject(numbers[obj.value - 1], float(obj.score), int(obj.area), obj.bbox)
        for obj in objects
        if 0 < obj.value <= len(numbers)
    ]


def signature(model: str, hq_only: bool, picture: st.Picture, objects: list[st.ObjectPrompt]) -> str:
    """What a picture's result depends on: the model, the HQ setting, the picture and its objects' prompts,
    candidate choices, numbers and categories."""
    text = json.dumps(
        [
            model,
            hq_only,
            picture.source,
            [[o.number, o.points, o.labels, o.box, o.choice, o.category] for o in objects if o.prompted],
        ]
    )
    return hashlib.sha1(text.encode()).hexdigest()


def write_previews(rgb_small: np.ndarray, target: Path) -> None:
    """The picture's preview (what the canvas shows) and its strip thumbnail."""
    target.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(rgb_small)
    image.save(target / "preview.jpg", quality=90)
    image.thumbnail((THUMB_SIDE, THUMB_SIDE))
    image.save(target / "thumb.jpg", quality=80)


def write_result(
    target: Path, labels: np.ndarray, objects: list[NumberedObject], prompted: list[st.ObjectPrompt], sig: str
) -> None:
    """The picture's result, each file written whole under a temporary name then renamed (an export reading
    it meanwhile sees the old file or the new one, never half of one)."""
    target.mkdir(parents=True, exist_ok=True)
    scores = {obj.value: obj.score for obj in objects}
    record = {
        "signature": sig,
        "width": int(labels.shape[1]),
        "height": int(labels.shape[0]),
        "objects": [{"number": o.number, "category": o.category, "score": scores.get(o.number)} for o in prompted],
    }
    for name, data in (("labels.png", encode_png(labels)), ("result.json", json.dumps(record).encode())):
        part = target / (name + ".part")
        part.write_bytes(data)
        part.replace(target / name)


def read_result(target: Path) -> dict[str, Any] | None:
    try:
        return json.loads((target / "result.json").read_text())
    except (OSError, ValueError):
        return None


def read_labels(target: Path) -> np.ndarray:
    with Image.open(target / "labels.png") as image:
        array = np.asarray(image)
    return array.astype(np.uint16 if array.dtype.itemsize > 1 or array.max(initial=0) > 255 else np.uint8)


def remove(target: Path) -> None:
    for path in sorted(target.glob("*"), reverse=True):
        path.unlink(missing_ok=True)
    try:
        target.rmdir()
    except OSError:
        pass
