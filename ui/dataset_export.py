"""A labeled session as the files training code reads: label maps, one PNG per object, COCO, YOLO.

Pure functions (numpy, Pillow, segmentation.export); the routes decide who may export what and when.

The zip (`write_dataset_zip`), for pictures `a.jpg` (objects 1, 2 and 4: Object 3 was deleted) and `b.png`:

    README.txt                          this layout, in short
    images/a.jpg                        the picture as uploaded (when its image_path is given)
    masks/a.png                         label map: pixel value = object number, 0 = background
    objects/a/object_1.png              one full-size mask per object, 1-bit: 1 inside, 0 outside
    objects/a/object_2.png
    objects/a/object_4.png
    objects/a/objects.json              the picture's objects: value (number), category, score, area,
                                        bbox [x0, y0, x1, y1] (inclusive, as the page's objects.json), RLE,
                                        polygons, file; "empty": numbers of objects without pixels
    labels/a.txt                        YOLO segmentation: one line per object, in number order
    annotations/instances_rle.json      COCO instances of every picture, masks as compressed RLE (exact)
    annotations/instances_polygons.json the same annotations, masks as polygons
    data.yaml                           YOLO data set: path, train, val, names

The number a person sees is the object's value everywhere: Object 4 is pixel value 4 in masks/a.png,
objects/a/object_4.png, "value": 4 in objects.json, "object_number": 4 (and attributes.object_number)
in both COCO files. Numbers are never renumbered to close gaps: a deleted object's number, or an
object that covers no pixel (another object took all of its pixels, or it has no prompt), is simply
absent from every file (objects.json lists the empty ones' numbers under "empty"). YOLO lines carry no
number: a picture's lines are its objects with pixels in increasing number order. Label maps are
8-bit PNGs, 16-bit when the picture has an object numbered above 255.

Why two COCO files: COCO polygons cannot hold a hole (pycocotools and the tools built on it fill the
union of an annotation's polygons), and many tools (Ultralytics' converter, CVAT/Label Studio imports,
torchvision's reference scripts) read polygons only; RLE is exact (holes, overlaps, single pixels) and
is what detectron2, MMDetection and pycocotools' evaluation read best. Both files have the same images,
categories and annotation ids, so either can be used alone. Polygons are in COCO's pixel frame (pixel
(x, y) covers [x, x+1) x [y, y+1)): pycocotools draws a hole-free part back to exactly its pixels. An
object of several parts has one polygon per part, and one per hole (which COCO's readers fill).

YOLO (Ultralytics segmentation format): `class x1 y1 x2 y2 ...`, coordinates divided by the picture's
width and height. One line per object, whatever its shape: its rings (parts and holes) are joined into
one outline by zero-width bridges, traced there and back, as Ultralytics' own COCO converter joins an
object's polygons; each ring is bridged to the nearest ring already joined, so bridges stay short.
Filled with the even-odd rule (OpenCV's fillPoly, Pillow's polygon) the outline gives the object's
parts with their holes; each bridge adds at most a one-pixel line (an object of a few parts: a few
pixels; a speckled one of hundreds of scattered specks: more, and past 400 rings every ring is bridged
to the largest; the RLE file is the exact one for such objects). A line per part would make each part an instance of its own, and the largest part
alone would lose the others. A
picture with no objects gets an empty .txt file (a background picture, as Ultralytics expects).
Categories get ids in order of first appearance (pictures in order, objects by number): COCO category
id k + 1 is YOLO class k and data.yaml's names[k].

Archive names: each picture gets a stem from its file name, with anything but letters, digits, `.`,
`-`, `_`, space and `+` replaced by `_`, no directories, no leading dot, at most 100 characters, and a
`-2`, `-3`, ... suffix when two pictures would share one (a.jpg and a.png become a and a-2; compared
ignoring case, as Windows and macOS file systems do). Ultralytics finds a picture's labels by its
stem, so images/, masks/, labels/ and objects/ all use it; the COCO images keep the uploaded name in
"original_name".
"""

from __future__ import annotations

import json
import re
import time
import unicodedata
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import numpy as np

from segmentation import export
from segmentation.masks import encode_bit_png, encode_png


@dataclass(frozen=True)
class ExportObject:
    """One object as the person numbered it; `category` names its class (COCO category, YOLO class)."""

    number: int
    category: str
    score: float | None


@dataclass(frozen=True)
class ExportPicture:
    """One picture of a session: its full-size label map (value = object number, 0 = background)."""

    name: str
    width: int
    height: int
    label_map: np.ndarray
    objects: tuple[ExportObject, ...]
    image_path: Path | None = None


@dataclass(frozen=True)
class ExportSummary:
    pictures: int
    objects: int
    bytes: int


class ExportLimitError(Exception):
    """An export stopped at a limit; the message says so in words a person understands."""

    def __init__(self, message: str, limit: float) -> None:
        super().__init__(message)
        self.limit = limit


class ExportTooLarge(ExportLimitError):  # noqa: N818 (the name the routes use)
    pass


class ExportTooSlow(ExportLimitError):  # noqa: N818
    pass


# YOLO coordinates: 6 decimals is a millionth of the side, well under a pixel of any picture we accept.
_YOLO_FORMAT = "%.6f"
_STEM_CHARACTERS = 100
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
# Already compressed: stored in the zip as they are (deflating them again costs time and gains nothing).
_STORED_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".avif", ".heic", ".jxl"}
_COPY_CHUNK = 1 << 20


# ---------------------------------------------------------------------------------------------- names


def safe_stem(name: str) -> str:
    """A file name's stem safe as one archive path component on every system (see the module docstring)."""
    base = re.split(r"[\\/]", str(name))[-1]
    stem = PurePosixPath(base).stem if "." in base.lstrip(".") else base
    stem = unicodedata.normalize("NFC", stem)
    stem = "".join(c if (c.isalnum() or c in "._- +") and c.isprintable() else "_" for c in stem)
    stem = stem.strip(" .")[:_STEM_CHARACTERS].strip(" .")
    if not stem:
        return "picture"
    if stem.split(".")[0].lower() in _WINDOWS_RESERVED:
        stem = "_" + stem
    return stem


def safe_suffix(name: str) -> str:
    """The name's extension, lower-cased, when it is a plain one (`.jpg`), else ''."""
    suffix = PurePosixPath(re.split(r"[\\/]", str(name))[-1]).suffix.lower()
    return suffix if re.fullmatch(r"\.[a-z0-9]{1,8}", suffix) else ""


def unique_stems(names: Sequence[str]) -> list[str]:
    """One stem per name, in order; a stem already taken (ignoring case) gets -2, -3, ..."""
    taken: set[str] = set()
    return [_unique_stem(name, taken) for name in names]


def _unique_stem(name: str, taken: set[str]) -> str:
    stem = base = safe_stem(name)
    count = 1
    while stem.casefold() in taken:
        count += 1
        stem = f"{base}-{count}"
    taken.add(stem.casefold())
    return stem


def _image_suffix(picture: ExportPicture) -> str:
    return safe_suffix(picture.name) or (safe_suffix(picture.image_path.name) if picture.image_path else "")


# ------------------------------------------------------------------------------------------ one picture


@dataclass(frozen=True)
class _Shape:
    """One object's pixels: what every format is written from."""

    obj: ExportObject
    region: export.Region
    rings: list[np.ndarray]  # COCO-frame outlines, (n, 2) each (its mask is not kept: see _crop)


def _check_picture(picture: ExportPicture) -> None:
    labels = picture.label_map
    if labels.ndim != 2 or labels.shape != (picture.height, picture.width):
        raise ValueError(
            f"{picture.name}: the label map is {labels.shape}, the picture {picture.height}x{picture.width} (rows x cols)"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{picture.name}: a label map holds integers, got {labels.dtype}")
    numbers = [obj.number for obj in picture.objects]
    if len(set(numbers)) != len(numbers) or any(n < 1 or n > 65535 for n in numbers):
        raise ValueError(f"{picture.name}: object numbers are distinct, from 1 to 65535, got {numbers}")
    if any(not obj.category.strip() for obj in picture.objects):
        raise ValueError(f"{picture.name}: every object needs a category name")


def _shapes(picture: ExportPicture, check: Callable[[], None]) -> list[_Shape]:
    """The picture's objects with pixels, by number; a map value no object claims is the caller's mistake."""
    _check_picture(picture)
    regions = export.label_map_regions(picture.label_map)
    by_number = {obj.number: obj for obj in picture.objects}
    strays = sorted(set(regions) - set(by_number))
    if strays:
        raise ValueError(f"{picture.name}: the label map has values {strays[:10]} that no object has")
    shapes = []
    for number in sorted(regions):
        check()
        region = regions[number]
        x0, y0, x1, y1 = region.bbox
        # COCO readers take a 4-number polygon for a box: only rings of 3 corners or more are written
        outlines = [ring for ring in export.rings(_crop(picture, region), origin=(x0, y0)) if len(ring) >= 3]
        if not outlines:  # cannot happen (a pixel traces to a diamond); its box then, never nothing
            outlines = [np.array([[x0, y0], [x1 + 1, y0], [x1 + 1, y1 + 1], [x0, y1 + 1]], dtype=np.float64)]
        shapes.append(_Shape(by_number[number], region, outlines))
    return shapes


def _crop(picture: ExportPicture, region: export.Region) -> np.ndarray:
    """The object's mask on its box, made when needed: kept for every object, boxes of large overlapping
    objects would hold many times the picture."""
    x0, y0, x1, y1 = region.bbox
    return picture.label_map[y0 : y1 + 1, x0 : x1 + 1] == region.value


def _label_png(picture: ExportPicture) -> bytes:
    highest = max((obj.number for obj in picture.objects), default=0)
    dtype = np.uint8 if highest <= 255 else np.uint16
    return encode_png(np.ascontiguousarray(picture.label_map, dtype=dtype))


def _object_png(picture: ExportPicture, shape: _Shape) -> bytes:
    x0, y0, _, _ = shape.region.bbox
    return encode_bit_png(picture.height, picture.width, _crop(picture, shape.region), y0, x0)


def _flat(ring: np.ndarray) -> list[float]:
    return ring.reshape(-1).tolist()  # corners are on the half-pixel grid: exact, nothing to round


# Past this many rings an object's YOLO outline bridges every ring to the largest (vectorised) rather than
# each to its nearest ring already joined (a loop over rings, each against the joined rings' corners).
_TREE_RINGS = 400
_MAIN_SAMPLES, _RING_SAMPLES = 256, 16  # corners of the largest ring / of each other ring that bridges may use


def _yolo_outline(rings: list[np.ndarray]) -> np.ndarray:
    """The rings as one closed outline, through zero-width bridges each traced there and back.

    The largest ring comes first; the others join in order of their distance to it, each bridged from its
    nearest corner to the nearest corner of a ring already joined (of up to 256 sampled corners of the
    largest and 16 of each other), so a cluster of parts is linked part to part, not each to the far
    largest one. The outline walks this tree: round each ring, and at a corner where another ring hangs,
    round that one and back."""
    if len(rings) == 1:
        return rings[0]
    if len(rings) > _TREE_RINGS:
        return _outline_to_largest(rings)
    rings = sorted(rings, key=len, reverse=True)
    samples = [
        np.arange(0, len(r), max(1, len(r) // (_RING_SAMPLES if k else _MAIN_SAMPLES))) for k, r in enumerate(rings)
    ]
    corners = [r[picked] for r, picked in zip(rings, samples)]
    distance = [0.0] + [
        float(((own[:, None, :] - corners[0][None, :, :]) ** 2).sum(axis=2).min()) for own in corners[1:]
    ]
    total = sum(len(picked) for picked in samples)
    xs, ys = np.empty(total), np.empty(total)  # the joined rings' sampled corners, x and y apart (fast sums)
    owner = np.empty(total, dtype=np.int64)
    index = np.empty(total, dtype=np.int64)
    filled = len(samples[0])
    xs[:filled], ys[:filled], owner[:filled], index[:filled] = corners[0][:, 0], corners[0][:, 1], 0, samples[0]
    hanging: dict[tuple[int, int], list[tuple[int, int]]] = {}  # (ring, corner) -> [(ring, its start corner)]
    for k in sorted(range(1, len(rings)), key=lambda k: distance[k]):
        own = corners[k]
        gaps = (own[:, 0, None] - xs[None, :filled]) ** 2 + (own[:, 1, None] - ys[None, :filled]) ** 2
        i, j = np.unravel_index(int(np.argmin(gaps)), gaps.shape)
        hanging.setdefault((int(owner[j]), int(index[j])), []).append((k, int(samples[k][i])))
        count = len(samples[k])
        xs[filled : filled + count], ys[filled : filled + count] = own[:, 0], own[:, 1]
        owner[filled : filled + count], index[filled : filled + count] = k, samples[k]
        filled += count
    pieces: list[np.ndarray] = []
    # an explicit stack (the tree may be deep): ("ring", ring, start corner, corners walked) or ("point", ring, corner)
    stack: list[tuple[str, int, int, int]] = [("ring", 0, 0, 0)]
    while stack:
        kind, ring, start, walked = stack.pop()
        if kind == "point":  # back over a bridge to the corner it left from
            pieces.append(rings[ring][start : start + 1])
            continue
        size = len(rings[ring])
        if walked == size:  # round: back to the start corner (the largest ring closes by itself)
            if ring != 0:
                pieces.append(rings[ring][start : start + 1])
            continue
        corner = (start + walked) % size
        pieces.append(rings[ring][corner : corner + 1])
        stack.append(("ring", ring, start, walked + 1))
        for child, child_start in reversed(hanging.get((ring, corner), [])):
            stack.append(("point", ring, corner, 0))
            stack.append(("ring", child, child_start, 0))
    return np.concatenate(pieces)


def _outline_to_largest(rings: list[np.ndarray]) -> np.ndarray:
    """`_yolo_outline` for very many rings: every ring bridged to the largest (from the nearest of up to
    512 sampled corners of it), vectorised over the small rings: a speckled object has 100 000 of them.
    A small ring (a speck) starts at its first corner; a large one at its corner nearest the largest."""
    rings = sorted(rings, key=len, reverse=True)
    main = rings[0]
    others = rings[1:]
    if not others:
        return main
    sample = np.arange(0, len(main), max(1, len(main) // 512))
    anchors = main[sample]
    at = np.empty(len(others), dtype=np.int64)
    start = np.zeros(len(others), dtype=np.int64)
    firsts = np.array([ring[0] for ring in others])
    for chunk in range(0, len(others), 2048):  # (2048, <=512) distances at a time
        gaps = ((firsts[chunk : chunk + 2048, None, :] - anchors[None, :, :]) ** 2).sum(axis=2)
        at[chunk : chunk + 2048] = sample[np.argmin(gaps, axis=1)]
    for k, ring in enumerate(others):
        if len(ring) > 16:
            picks = np.arange(0, len(ring), max(1, len(ring) // 512))
            gaps = ((anchors[:, None, :] - ring[None, picks, :]) ** 2).sum(axis=2)
            i, j = np.unravel_index(int(np.argmin(gaps)), gaps.shape)
            at[k], start[k] = sample[i], picks[j]
    order = np.argsort(at, kind="stable")
    pieces: list[np.ndarray] = []
    done = 0
    for k in order.tolist():
        a, ring, s = int(at[k]), others[k], int(start[k])
        if a + 1 > done:
            pieces.append(main[done : a + 1])
            done = a + 1
        pieces.extend((ring[s:], ring[: s + 1], main[a : a + 1]))  # round the ring, back where it started, back
    pieces.append(main[done:])
    return np.concatenate(pieces)


def _yolo_text(picture: ExportPicture, shapes: list[_Shape], classes: dict[str, int]) -> bytes:
    scale = np.array([picture.width, picture.height], dtype=np.float64)
    lines = []
    for shape in shapes:
        outline = np.clip(_yolo_outline(shape.rings) / scale, 0.0, 1.0)
        values = outline.reshape(-1).tolist()
        lines.append(f"{classes[shape.obj.category]} " + " ".join([_YOLO_FORMAT] * len(values)) % tuple(values) + "\n")
    return "".join(lines).encode()


def _coco_bbox(region: export.Region) -> list[int]:
    x0, y0, x1, y1 = region.bbox
    return [x0, y0, x1 - x0 + 1, y1 - y0 + 1]


def _objects_json(picture: ExportPicture, stem: str, shapes: list[_Shape]) -> bytes:
    with_pixels = {shape.obj.number for shape in shapes}
    document = {
        "name": picture.name,
        "image": f"images/{stem}{_image_suffix(picture)}",
        "mask": f"masks/{stem}.png",
        "width": picture.width,
        "height": picture.height,
        "objects": [
            {
                "value": shape.obj.number,
                "name": f"Object {shape.obj.number}",
                "category": shape.obj.category,
                "score": shape.obj.score,
                "area": shape.region.area,
                "bbox": list(shape.region.bbox),
                "file": f"objects/{stem}/object_{shape.obj.number}.png",
                "rle": shape.region.rle,
                "polygons": [_flat(ring) for ring in shape.rings],
            }
            for shape in shapes
        ],
        "empty": sorted(obj.number for obj in picture.objects if obj.number not in with_pixels),
    }
    return json.dumps(document).encode()


def _picture_files(
    picture: ExportPicture,
    stem: str,
    shapes: list[_Shape],
    classes: dict[str, int],
    check: Callable[[], None],
) -> Iterator[tuple[str, bytes]]:
    yield f"masks/{stem}.png", _label_png(picture)
    for shape in shapes:
        check()
        yield f"objects/{stem}/object_{shape.obj.number}.png", _object_png(picture, shape)
    yield f"objects/{stem}/objects.json", _objects_json(picture, stem, shapes)
    yield f"labels/{stem}.txt", _yolo_text(picture, shapes, classes)


def _categories(pictures: Sequence[ExportPicture], classes: dict[str, int] | None = None) -> dict[str, int]:
    """Category name -> YOLO class (0-based), in order of first appearance (pictures in order, by number).
    Given `classes`, the pictures' new categories are added to it: a picture's ids never depend on later ones."""
    classes = {} if classes is None else classes
    for picture in pictures:
        for obj in sorted(picture.objects, key=lambda o: o.number):
            classes.setdefault(obj.category.strip(), len(classes))
    return classes


def _stripped(picture: ExportPicture) -> ExportPicture:
    objects = tuple(ExportObject(o.number, o.category.strip(), o.score) for o in picture.objects)
    return ExportPicture(picture.name, picture.width, picture.height, picture.label_map, objects, picture.image_path)


def picture_files(picture: ExportPicture) -> dict[str, bytes]:
    """One picture's files by archive name (the zip's layout, stem from its own name): label map, object
    PNGs, objects.json, YOLO labels, and the picture itself when image_path is given. The data set's
    shared files (COCO, data.yaml) come with `write_dataset_zip`; for one picture's complete data set,
    call that with one picture. YOLO classes count from this picture's own categories."""
    picture = _stripped(picture)
    stem = safe_stem(picture.name)
    shapes = _shapes(picture, lambda: None)
    files = dict(_picture_files(picture, stem, shapes, _categories([picture]), lambda: None))
    if picture.image_path is not None:
        files[f"images/{stem}{_image_suffix(picture)}"] = Path(picture.image_path).read_bytes()
    return files


# ---------------------------------------------------------------------------------------------- data set


def _coco_documents(entries: list[dict[str, Any]], classes: dict[str, int]) -> tuple[dict, dict]:
    """(RLE document, polygons document) from the per-picture entries gathered while writing."""
    categories = [{"id": k + 1, "name": name, "supercategory": ""} for name, k in classes.items()]
    images, rle_annotations, polygon_annotations = [], [], []
    annotation_id = 0
    for image_id, entry in enumerate(entries, start=1):
        images.append({"id": image_id, **entry["image"]})
        for item in entry["annotations"]:
            annotation_id += 1
            common = {
                "id": annotation_id,
                "image_id": image_id,
                "category_id": classes[item["category"]] + 1,
                "area": item["area"],
                "bbox": item["bbox"],
                "iscrowd": 0,
                "object_number": item["number"],
                "attributes": {"object_number": item["number"], "name": f"Object {item['number']}"},
                **({"score": item["score"]} if item["score"] is not None else {}),
            }
            rle_annotations.append({**common, "segmentation": item["rle"]})
            polygon_annotations.append({**common, "segmentation": item["polygons"]})
    info = {"description": "SAM-HQ labeling export", "version": "1.0"}
    rle_doc = {"info": info, "licenses": [], "images": images, "annotations": rle_annotations, "categories": categories}
    polygon_doc = {**rle_doc, "annotations": polygon_annotations}
    return rle_doc, polygon_doc


def _data_yaml(classes: dict[str, int]) -> bytes:
    """Ultralytics' data set file; JSON strings are valid YAML scalars, so any category name is safe."""
    lines = [
        "# YOLO segmentation data set (Ultralytics). Every picture is in train and val: split them as you need.",
        "path: .  # the folder this file is in",
        "train: images",
        "val: images",
        "names:",
        *(f"  {k}: {json.dumps(name, ensure_ascii=False)}" for name, k in classes.items()),
    ]
    if not classes:
        lines[-1] = "names: {}"
    return ("\n".join(lines) + "\n").encode()


_README = """SAM-HQ labeling export

images/<stem>.<ext>              the pictures as uploaded (when the session kept them)
masks/<stem>.png                 label maps: pixel value = the object's number, 0 = background
                                 (8-bit, 16-bit when an object is numbered above 255)
objects/<stem>/object_<n>.png    one mask per object, 1-bit PNG: set inside object n
                                 (Pillow reads mode "1", OpenCV 0/255)
objects/<stem>/objects.json      the picture's objects: value, category, score, area, bbox, RLE, polygons
labels/<stem>.txt                YOLO segmentation, one line per object in number order
annotations/instances_rle.json       COCO instances, masks as compressed RLE (exact)
annotations/instances_polygons.json  the same, masks as polygons (holes are filled by COCO readers)
data.yaml                        YOLO data set (train = val = images/)

Object numbers are the ones shown while labeling; a deleted or empty object's number is absent.
"""


class _CountingWriter:
    """The zip's output: counts bytes and stops the export the moment the byte limit would be passed.

    Seeks pass through when `out` can seek (zipfile then writes plain local headers), positions
    counted from where `out` was; otherwise zipfile writes its sizes after each file's data."""

    def __init__(self, out: BinaryIO, max_bytes: int) -> None:
        self.out, self.max_bytes = out, max_bytes
        try:
            self.can_seek = bool(out.seekable())
            self.origin = out.tell() if self.can_seek else 0
        except (AttributeError, OSError):
            self.can_seek, self.origin = False, 0
        self.position = self.size = 0
        self.dead = False

    def write(self, data: bytes) -> int:
        if self.dead:  # an export that stopped: nothing more reaches `out` (no central directory, no zip)
            return len(data)
        end = self.position + len(data)
        if end > self.max_bytes:
            raise ExportTooLarge(
                f"This export is larger than {_megabytes(self.max_bytes)}, the most one zip may hold. "
                "Export fewer pictures at a time.",
                self.max_bytes,
            )
        self.out.write(data)
        self.position, self.size = end, max(self.size, end)
        return len(data)

    def tell(self) -> int:
        return self.position

    def seekable(self) -> bool:
        return self.can_seek

    def seek(self, offset: int, whence: int = 0) -> int:
        if not self.can_seek:
            raise OSError("the export's output cannot seek")
        base = {0: 0, 1: self.position, 2: self.size}[whence]
        self.position = base + offset
        self.out.seek(self.origin + self.position)
        return self.position

    def flush(self) -> None:
        self.out.flush()


def _megabytes(count: int) -> str:
    return f"{count / 1e6:.0f} MB" if count >= 1e6 else f"{count:,} bytes"


def write_dataset_zip(
    pictures: Sequence[ExportPicture],
    out: BinaryIO,
    *,
    max_bytes: int,
    deadline_s: float,
) -> ExportSummary:
    """Write the whole data set (layout in the module docstring) into `out`, picture by picture: each
    picture is taken from `pictures` when its turn comes and let go after (a lazy sequence that reads a
    picture's map in __getitem__ holds one map at a time); only the COCO annotations accumulate.

    Raises ExportTooLarge when the zip would pass `max_bytes`, and ExportTooSlow when writing takes
    longer than `deadline_s` seconds from this call; `out` then holds an unfinished zip the caller
    throws away (nothing is claimed: no summary is returned). Bad input (a label map of the wrong size,
    a value no object has) raises ValueError before anything of that picture is written."""
    started = time.monotonic()

    def check() -> None:
        if time.monotonic() - started > deadline_s:
            raise ExportTooSlow(
                f"This export took longer than {max(deadline_s, 0):.3g} seconds, the most one export may take. "
                "Export fewer pictures at a time.",
                deadline_s,
            )

    classes: dict[str, int] = {}
    taken: set[str] = set()
    writer = _CountingWriter(out, max_bytes)
    entries: list[dict[str, Any]] = []
    objects = 0
    archive = zipfile.ZipFile(writer, "w", zipfile.ZIP_DEFLATED, compresslevel=6)  # type: ignore[arg-type]
    try:
        _add(archive, "README.txt", _README.encode())
        for index in range(len(pictures)):  # one at a time: a lazy sequence reads each map only here
            check()
            picture = _stripped(pictures[index])
            stem = _unique_stem(picture.name, taken)
            shapes = _shapes(picture, check)
            _categories([picture], classes)
            image_name = f"{stem}{_image_suffix(picture)}"
            if picture.image_path is not None:
                _copy_image(archive, f"images/{image_name}", Path(picture.image_path), check)
            for name, data in _picture_files(picture, stem, shapes, classes, check):
                check()
                _add(archive, name, data)
            objects += len(shapes)
            entries.append(
                {
                    "image": {
                        "file_name": image_name,
                        "width": picture.width,
                        "height": picture.height,
                        "original_name": picture.name,
                    },
                    "annotations": [
                        {
                            "number": s.obj.number,
                            "category": s.obj.category,
                            "score": s.obj.score,
                            "area": s.region.area,
                            "bbox": _coco_bbox(s.region),
                            "rle": s.region.rle,
                            "polygons": [_flat(ring) for ring in s.rings],
                        }
                        for s in shapes
                    ],
                }
            )
            del shapes, picture
        check()
        rle_doc, polygon_doc = _coco_documents(entries, classes)
        _add(archive, "annotations/instances_rle.json", json.dumps(rle_doc).encode())
        del rle_doc
        _add(archive, "annotations/instances_polygons.json", json.dumps(polygon_doc).encode())
        del polygon_doc
        _add(archive, "data.yaml", _data_yaml(classes))
        check()
        archive.close()
    except BaseException:
        writer.dead = True
        archive.fp = None  # so neither close() nor the garbage collector writes a central directory
        raise
    return ExportSummary(pictures=len(entries), objects=objects, bytes=writer.size)


def _add(archive: zipfile.ZipFile, name: str, data: bytes) -> None:
    stored = PurePosixPath(name).suffix.lower() in _STORED_SUFFIXES
    archive.writestr(name, data, compress_type=zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED)


def _copy_image(archive: zipfile.ZipFile, name: str, source: Path, check: Callable[[], None]) -> None:
    """The uploaded picture, copied in chunks (never whole in memory), checking the clock between them."""
    stored = PurePosixPath(name).suffix.lower() in _STORED_SUFFIXES
    info = zipfile.ZipInfo(name, date_time=time.localtime()[:6])
    info.compress_type = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
    info.file_size = source.stat().st_size  # lets zipfile choose ZIP64 only for a picture that needs it
    with source.open("rb") as src, archive.open(info, "w") as dst:
        while chunk := src.read(_COPY_CHUNK):
            check()
            dst.write(chunk)
