"""The data set export read back by each format's own reader: Pillow for the PNGs, pycocotools for COCO,
a YOLO reader written here from the format's description (rasterised with Pillow), PyYAML for data.yaml.

Small pictures, no model: the module is pure functions over label maps."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import PurePosixPath

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw

from segmentation import export
from ui.dataset_export import (
    ExportObject,
    ExportPicture,
    ExportTooLarge,
    ExportTooSlow,
    picture_files,
    unique_stems,
    write_dataset_zip,
)

coco_module = pytest.importorskip("pycocotools.coco")
coco_mask = pytest.importorskip("pycocotools.mask")

H, W = 60, 80


def _scene() -> np.ndarray:
    """Objects 1, 2, 4 and 6 (3 was deleted, 5 covers no pixel): a disc, a donut with a blob beside it
    (two parts, one hole), a single pixel in the corner, and a diagonal staircase."""
    labels = np.zeros((H, W), dtype=np.uint8)
    y, x = np.mgrid[0:H, 0:W]
    labels[(x - 15) ** 2 + (y - 15) ** 2 < 10**2] = 1
    ring = ((x - 50) ** 2 + (y - 25) ** 2 < 14**2) & ((x - 50) ** 2 + (y - 25) ** 2 >= 6**2)
    labels[ring] = 2
    labels[45:55, 60:75] = 2  # a second part of object 2
    labels[H - 1, W - 1] = 4  # one pixel, on the picture's border
    for k in range(12):
        labels[35 + k, 10 + k : 13 + k] = 6
    return labels


OBJECTS = (
    ExportObject(1, "cat", 0.91),
    ExportObject(2, "dog", None),
    ExportObject(4, "cat", 0.5),
    ExportObject(5, "dog", 0.7),  # listed, but no pixel: absent from every file
    ExportObject(6, "bird", 0.8),
)


def _picture(name: str = "a.jpg", labels: np.ndarray | None = None, objects=OBJECTS, image_path=None):
    labels = _scene() if labels is None else labels
    return ExportPicture(name, labels.shape[1], labels.shape[0], labels, tuple(objects), image_path)


def _zip(pictures, **limits) -> tuple[zipfile.ZipFile, object]:
    out = io.BytesIO()
    summary = write_dataset_zip(pictures, out, max_bytes=limits.get("max_bytes", 50_000_000), deadline_s=60)
    assert summary.bytes == len(out.getvalue())
    return zipfile.ZipFile(io.BytesIO(out.getvalue())), summary


def _holes_filled(mask: np.ndarray) -> np.ndarray:
    """The mask with its holes filled: whatever background the picture's border cannot reach."""
    canvas = Image.fromarray(np.pad(~mask, 1, constant_values=True).astype(np.uint8) * 255).copy()
    ImageDraw.floodfill(canvas, (0, 0), 128)
    return (np.asarray(canvas)[1:-1, 1:-1] != 128) | mask


def _read_yolo(text: str, width: int, height: int) -> list[tuple[int, np.ndarray]]:
    """YOLO segmentation labels as the format describes them: per line a class index, then x y pairs
    divided by the picture's width and height. Each outline is filled with the even-odd rule (Pillow's)
    at 5x and read at the pixels' centres (sub-pixel 5i + 2 is centred on pixel i), so Pillow's habit of
    also filling every pixel an edge touches costs a fifth of a pixel, not a whole one."""
    shapes = []
    for line in text.splitlines():
        fields = line.split()
        assert len(fields) >= 7 and len(fields) % 2 == 1, line[:80]
        points = np.array(fields[1:], dtype=np.float64).reshape(-1, 2)
        assert (points >= 0).all() and (points <= 1).all()
        canvas = Image.new("L", (width * 5, height * 5), 0)
        corners = [(px * width * 5 - 0.5, py * height * 5 - 0.5) for px, py in points]
        ImageDraw.Draw(canvas).polygon(corners, fill=1)
        shapes.append((int(fields[0]), np.asarray(canvas)[2::5, 2::5].astype(bool)))
    return shapes


def test_label_map_regions_match_pycocotools_on_random_maps():
    rng = np.random.default_rng(7)
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(1, 12, 2))
        labels = rng.integers(0, 5, (h, w)).astype(np.uint16)
        labels[rng.random((h, w)) < rng.random()] = 0
        regions = export.label_map_regions(labels, band_pixels=int(rng.integers(1, 50)))
        assert sorted(regions) == [int(v) for v in np.unique(labels) if v]
        for value, region in regions.items():
            mask = labels == value
            theirs = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
            assert region.rle["counts"] == theirs["counts"].decode()
            assert region.area == int(coco_mask.area(theirs))
            x0, y0, x1, y1 = region.bbox
            assert [x0, y0, x1 - x0 + 1, y1 - y0 + 1] == coco_mask.toBbox(theirs).tolist()


def test_pngs_hold_the_numbers_a_person_sees(tmp_path):
    labels = _scene()
    archive, summary = _zip([_picture()])
    assert (summary.pictures, summary.objects) == (1, 4)
    with Image.open(io.BytesIO(archive.read("masks/a.png"))) as image:
        assert image.mode == "L"
        np.testing.assert_array_equal(np.asarray(image), labels)
    names = {n for n in archive.namelist() if n.startswith("objects/a/object_")}
    assert names == {f"objects/a/object_{n}.png" for n in (1, 2, 4, 6)}  # 3 deleted, 5 empty: absent
    for number in (1, 2, 4, 6):
        with Image.open(io.BytesIO(archive.read(f"objects/a/object_{number}.png"))) as image:
            assert image.size == (W, H)
            np.testing.assert_array_equal(np.asarray(image.convert("L")) > 0, labels == number)
    document = json.loads(archive.read("objects/a/objects.json"))
    assert [item["value"] for item in document["objects"]] == [1, 2, 4, 6]
    assert document["empty"] == [5] and document["name"] == "a.jpg"
    assert [item["category"] for item in document["objects"]] == ["cat", "dog", "cat", "bird"]
    for item in document["objects"]:
        rle = {"size": item["rle"]["size"], "counts": item["rle"]["counts"].encode()}
        np.testing.assert_array_equal(coco_mask.decode(rle).astype(bool), labels == item["value"])
        assert item["area"] == int((labels == item["value"]).sum())


def test_coco_files_load_in_pycocotools_and_give_the_masks_back(tmp_path):
    labels = _scene()
    archive, _ = _zip([_picture(), _picture("empty.png", np.zeros((20, 30), np.uint8), ())])
    archive.extractall(tmp_path)
    rle = coco_module.COCO(str(tmp_path / "annotations/instances_rle.json"))
    polygons = coco_module.COCO(str(tmp_path / "annotations/instances_polygons.json"))
    assert [c["name"] for c in rle.loadCats(rle.getCatIds())] == ["cat", "dog", "bird"]  # first appearance
    first, empty = rle.loadImgs(rle.getImgIds())
    assert (first["file_name"], first["width"], first["height"]) == ("a.jpg", W, H)
    assert empty["file_name"] == "empty.png" and rle.getAnnIds(imgIds=[empty["id"]]) == []
    annotations = rle.loadAnns(rle.getAnnIds(imgIds=[first["id"]]))
    assert [a["object_number"] for a in annotations] == [1, 2, 4, 6]
    assert [a["attributes"]["object_number"] for a in annotations] == [1, 2, 4, 6]
    for annotation in annotations:
        mask = labels == annotation["object_number"]
        np.testing.assert_array_equal(rle.annToMask(annotation).astype(bool), mask)  # RLE: exact
        assert (
            rle.loadCats(annotation["category_id"])[0]["name"]
            == {1: "cat", 2: "dog", 4: "cat", 6: "bird"}[annotation["object_number"]]
        )
        twin = polygons.loadAnns(annotation["id"])[0]
        assert twin["object_number"] == annotation["object_number"] and twin["bbox"] == annotation["bbox"]
        assert all(len(ring) >= 6 and len(ring) % 2 == 0 for ring in twin["segmentation"])
        # Polygons: pycocotools fills their union, so an object comes back exactly with its holes filled
        # (COCO polygons cannot hold a hole; the RLE file is the exact one).
        np.testing.assert_array_equal(polygons.annToMask(twin).astype(bool), _holes_filled(mask))
    donut = next(a for a in polygons.loadAnns(polygons.getAnnIds()) if a["object_number"] == 2)
    assert len(donut["segmentation"]) == 3  # the ring's outside, its hole, the second part


def test_yolo_labels_and_data_yaml_read_back(tmp_path):
    labels = _scene()
    archive, _ = _zip([_picture(), _picture("b.png", np.zeros((20, 30), np.uint8), ())])
    data = yaml.safe_load(archive.read("data.yaml"))
    assert data["names"] == {0: "cat", 1: "dog", 2: "bird"}
    assert data["train"] == "images" and data["val"] == "images" and "path" in data
    assert archive.read("labels/b.txt") == b""  # a picture without objects: a background picture
    shapes = _read_yolo(archive.read("labels/a.txt").decode(), W, H)
    classes = {0: "cat", 1: "dog", 2: "bird"}
    assert [classes[c] for c, _ in shapes] == ["cat", "dog", "cat", "bird"]  # objects 1, 2, 4, 6 in order
    for number, (_, drawn) in zip((1, 2, 4, 6), shapes):
        mask = labels == number
        if number != 2:  # one ring: read at the pixels' centres, the outline gives the object exactly
            np.testing.assert_array_equal(drawn, mask)
    # Object 2 is a ring and a blob beside it: one line, its three rings joined by bridges traced there
    # and back. Even-odd filling keeps the hole open and both parts whole; a bridge is a line with no
    # area but may pass within a fifth of a pixel of a few pixels' centres (at most about one per pixel of
    # its length; both bridges here are under 15 pixels long).
    drawn, mask = shapes[1][1], labels == 2
    assert drawn[mask].all() and (drawn & ~mask).sum() <= 15
    hole = (labels == 0) & _holes_filled(mask)
    assert hole.sum() > 80 and not drawn[_interior(hole)].any()


def _interior(mask: np.ndarray) -> np.ndarray:
    """The mask's pixels whose four neighbours are in the mask too (away from any outline)."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return inner


def test_more_than_255_objects_write_a_16_bit_label_map(tmp_path):
    labels = np.zeros((40, 80), dtype=np.uint16)
    numbers = list(range(1, 301))
    for n in numbers:
        labels[(n - 1) // 20 * 2, (n - 1) % 20 * 4 : (n - 1) % 20 * 4 + 3] = n
    picture = _picture("many.png", labels, [ExportObject(n, "thing", None) for n in numbers])
    files = picture_files(picture)
    with Image.open(io.BytesIO(files["masks/many.png"])) as image:
        assert image.mode.startswith("I")
        np.testing.assert_array_equal(np.asarray(image).astype(np.int64), labels.astype(np.int64))
    archive, summary = _zip([picture])
    assert summary.objects == 300
    archive.extractall(tmp_path)
    coco = coco_module.COCO(str(tmp_path / "annotations/instances_rle.json"))
    assert sorted(a["object_number"] for a in coco.loadAnns(coco.getAnnIds())) == numbers
    assert len(archive.read("labels/many.txt").decode().splitlines()) == 300


def test_names_collide_or_try_to_leave_the_archive(tmp_path):
    names = ["a.jpg", "a.png", "A.JPG", "../../etc/passwd", "/abs/b.png", "c:\\x\\con.png", "...", "é t.png"]
    assert unique_stems(names) == ["a", "a-2", "A-3", "passwd", "b", "_con", "picture", "é t"]
    pictures = [_picture(name, np.zeros((4, 5), np.uint8), ()) for name in names]
    archive, summary = _zip(pictures)
    assert summary.pictures == len(names)
    for name in archive.namelist():
        path = PurePosixPath(name)
        assert not path.is_absolute() and ".." not in path.parts and "\\" not in name and ":" not in name
    labels = sorted(n for n in archive.namelist() if n.startswith("labels/"))
    assert len(labels) == len(names) == len({n.casefold() for n in labels})
    archive.extractall(tmp_path)  # every file lands inside the folder
    assert all(p.resolve().is_relative_to(tmp_path.resolve()) for p in tmp_path.rglob("*"))
    coco = json.loads(archive.read("annotations/instances_rle.json"))
    assert [image["original_name"] for image in coco["images"]] == names


def test_the_uploaded_picture_is_copied_as_it_was(tmp_path):
    source = tmp_path / "photo.jpeg"
    Image.fromarray(np.full((H, W, 3), 90, np.uint8)).save(source)
    archive, _ = _zip([_picture("photo.jpeg", image_path=source)])
    assert archive.read("images/photo.jpeg") == source.read_bytes()
    assert archive.getinfo("images/photo.jpeg").compress_type == zipfile.ZIP_STORED
    assert archive.getinfo("masks/photo.png").compress_type == zipfile.ZIP_STORED
    assert archive.getinfo("annotations/instances_rle.json").compress_type == zipfile.ZIP_DEFLATED
    assert archive.testzip() is None
    assert set(picture_files(_picture("photo.jpeg", image_path=source))) == {
        "images/photo.jpeg",
        "masks/photo.png",
        "objects/photo/objects.json",
        "labels/photo.txt",
        *(f"objects/photo/object_{n}.png" for n in (1, 2, 4, 6)),
    }


def test_limits_stop_the_export_and_leave_no_zip(tmp_path):
    pictures = [_picture(f"p{k}.png") for k in range(3)]
    out = io.BytesIO()
    with pytest.raises(ExportTooLarge, match="larger than 2,000 bytes") as too_large:
        write_dataset_zip(pictures, out, max_bytes=2000, deadline_s=60)
    assert too_large.value.limit == 2000 and len(out.getvalue()) <= 2000
    with pytest.raises(zipfile.BadZipFile):
        zipfile.ZipFile(io.BytesIO(out.getvalue()))
    slow = io.BytesIO()
    with pytest.raises(ExportTooSlow, match="longer than 0 seconds"):
        write_dataset_zip(pictures, slow, max_bytes=50_000_000, deadline_s=0)
    with pytest.raises(zipfile.BadZipFile):
        zipfile.ZipFile(io.BytesIO(slow.getvalue()))
    # to a file that can seek, as to a stream that cannot: the same zip
    with (tmp_path / "d.zip").open("wb") as handle:
        handle.write(b"x" * 10)  # the zip need not start the file
        on_disk = write_dataset_zip(pictures[:1], handle, max_bytes=50_000_000, deadline_s=60)
    assert on_disk.bytes == (tmp_path / "d.zip").stat().st_size - 10
    with zipfile.ZipFile(tmp_path / "d.zip") as written:
        assert written.testzip() is None and "masks/p0.png" in written.namelist()

    class Stream(io.RawIOBase):  # a response body: written once, front to back
        def __init__(self):
            self.data = bytearray()

        def writable(self):
            return True

        def write(self, chunk):
            self.data += chunk
            return len(chunk)

    stream = Stream()
    streamed = write_dataset_zip(pictures, stream, max_bytes=50_000_000, deadline_s=60)
    with zipfile.ZipFile(io.BytesIO(bytes(stream.data))) as written:
        assert written.testzip() is None and streamed.bytes == len(stream.data) and streamed.pictures == 3
    with pytest.raises(ExportTooLarge):
        write_dataset_zip(pictures, Stream(), max_bytes=5_000, deadline_s=60)


def test_bad_pictures_are_refused_in_words():
    with pytest.raises(ValueError, match="values \\[6\\] that no object has"):
        picture_files(_picture(objects=OBJECTS[:3]))
    with pytest.raises(ValueError, match="label map is"):
        picture_files(ExportPicture("x.png", W + 1, H, _scene(), OBJECTS, None))
    with pytest.raises(ValueError, match="category"):
        picture_files(_picture(objects=[*OBJECTS[:4], ExportObject(6, " ", None)]))


def test_a_large_object_traced_in_strips_reads_back_exactly(tmp_path):
    """Masks past export.STRIP_POINTS are traced in strips and joined: COCO still gives them back."""
    labels = np.zeros((300, 200), np.uint8)
    y, x = np.mgrid[0:300, 0:200]
    labels[((x - 100) / 90.0) ** 2 + ((y - 150) / 140.0) ** 2 < 1] = 1
    outlines = export.polygons(labels == 1, strip_points=5_000)  # ~24 rows a strip
    rle = coco_mask.merge(coco_mask.frPyObjects(outlines, 300, 200))
    np.testing.assert_array_equal(coco_mask.decode(rle).astype(bool), labels == 1)
    assert len(outlines) == 1  # one loop, joined back across the strips


def test_a_speckled_object_of_a_thousand_parts_still_reads_back(tmp_path):
    """A noisy mask (random weights, a texture) has a ring per speck: the outline code works on all rings at
    once. RLE stays exact; the polygons differ from the mask only where two pixels touch by a corner (the
    outline may join or part them there: here 1 pixel in 4 000); the one YOLO line covers the object, but
    bridges to far specks cross the background (said in the module docstring)."""
    rng = np.random.default_rng(1)
    labels = (rng.random((120, 150)) < 0.08).astype(np.uint8)
    labels[30:80, 40:100] = 1
    mask = labels == 1
    files = picture_files(_picture("s.png", labels, [ExportObject(1, "noise", None)]))
    item = json.loads(files["objects/s/objects.json"])["objects"][0]
    rle = {"size": item["rle"]["size"], "counts": item["rle"]["counts"].encode()}
    np.testing.assert_array_equal(coco_mask.decode(rle).astype(bool), mask)
    assert len(item["polygons"]) > 900
    drawn = coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(item["polygons"], 120, 150))).astype(bool)
    assert (drawn != _holes_filled(mask)).sum() <= 0.01 * mask.sum()
    (line,) = _read_yolo(files["labels/s.txt"].decode(), 150, 120)
    assert drawn[mask].mean() >= 0.99 and line[1][mask].mean() >= 0.99


def test_a_lazy_sequence_of_pictures_is_read_one_at_a_time():
    """The session's export hands a sequence that reads each picture's map when asked: the writer asks for
    each once, in order, and has let go of the previous map by then (200 maps never sit in memory together)."""
    import weakref
    from collections.abc import Sequence

    class Lazy(Sequence):
        def __init__(self):
            self.asked: list[int] = []
            self.previous = None

        def __len__(self):
            return 3

        def __getitem__(self, index):
            assert self.previous is None or self.previous() is None, "the previous map is still held"
            self.asked.append(index)
            labels = _scene()
            self.previous = weakref.ref(labels)
            return _picture(f"p{index}.png", labels)

    lazy = Lazy()
    archive, summary = _zip(lazy)
    assert lazy.asked == [0, 1, 2] and summary.pictures == 3
    assert yaml.safe_load(archive.read("data.yaml"))["names"] == {0: "cat", 1: "dog", 2: "bird"}


def test_an_object_of_many_parts_is_one_yolo_line_with_short_bridges():
    """A block and ~170 specks around it: each speck is bridged to its nearest joined part, so the one line
    covers every pixel and the bridges add a few percent (bridged each to the block: over 10%)."""
    rng = np.random.default_rng(1)
    labels = (rng.random((200, 250)) < 0.004).astype(np.uint8)
    labels[60:140, 80:170] = 1
    mask = labels == 1
    files = picture_files(_picture("m.png", labels, [ExportObject(1, "parts", None)]))
    (line,) = _read_yolo(files["labels/m.txt"].decode(), 250, 200)
    drawn = line[1]
    assert drawn[mask].all() and (drawn & ~mask).sum() <= 0.06 * mask.sum()
