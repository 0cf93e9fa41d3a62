"""COCO RLE of every object of a label map: this repository's encoder against pycocotools, side by side;
then what the whole data set zip (ui/dataset_export.py) costs a picture.

    python benchmarks/rle_bench.py                       # 2000x1500, 20 objects, a 10-picture zip
    python benchmarks/rle_bench.py --size 5472x3648 --objects 60 --reps 9 --pictures 3

Both encoders produce the RLE, area and bbox of each object value of one label map (what a COCO
annotation needs); the answers are checked equal before timing. Reps alternate between them; medians
and ratios print. The zip holds --pictures copies of the map (no uploaded pictures: those are copied
as they are), written to memory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from segmentation.export import label_map_regions  # noqa: E402


def label_map(width: int, height: int, objects: int, seed: int = 0) -> np.ndarray:
    """Overlapping ellipses of 1%-10% of the picture's side, later objects on top (as composing does)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((height, width), np.uint8 if objects < 256 else np.uint16)
    yy, xx = np.ogrid[:height, :width]
    side = min(width, height)
    for value in range(1, objects + 1):
        cy, cx = rng.integers(0, height), rng.integers(0, width)
        ry, rx = rng.integers(side // 100 + 2, side // 5, 2)
        labels[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1] = value
    return labels


def ours(labels: np.ndarray, objects: int) -> list[tuple[str, int, list[int]]]:
    regions = label_map_regions(labels)
    out = []
    for value in sorted(regions):
        x0, y0, x1, y1 = regions[value].bbox
        out.append((regions[value].rle["counts"], regions[value].area, [x0, y0, x1 - x0 + 1, y1 - y0 + 1]))
    return out


def pycocotools(labels: np.ndarray, objects: int) -> list[tuple[str, int, list[int]]]:
    from pycocotools import mask as coco_mask

    columns = np.ascontiguousarray(labels.T)  # compares on the transpose are Fortran-ordered masks, no copy
    out = []
    for value in range(1, objects + 1):
        rle = coco_mask.encode((columns == value).T.view(np.uint8))
        area = int(coco_mask.area(rle))
        if area:
            out.append((rle["counts"].decode(), area, [int(v) for v in coco_mask.toBbox(rle)]))
    return out


def pycocotools_given_masks(masks: list[np.ndarray]) -> list[dict]:
    """pycocotools' encode alone, the per-object masks already made (a lower bound for it)."""
    from pycocotools import mask as coco_mask

    return [coco_mask.encode(mask) for mask in masks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="2000x1500")
    parser.add_argument("--objects", type=int, default=20)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--pictures", type=int, default=10)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    labels = label_map(width, height, args.objects)
    assert ours(labels, args.objects) == pycocotools(labels, args.objects), "the encoders disagree"
    columns = np.ascontiguousarray(labels.T)
    masks = [(columns == value).T.view(np.uint8) for value in range(1, args.objects + 1)]
    runs = {
        "ours": lambda: ours(labels, args.objects),
        "pycocotools": lambda: pycocotools(labels, args.objects),
        "pycocotools encode only": lambda: pycocotools_given_masks(masks),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.reps):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) * 1000 for name, values in times.items()}
    print(f"{width}x{height}, {args.objects} objects, {args.reps} reps (RLE + area + bbox of every object)")
    for name, ms in medians.items():
        print(f"  {name:24s} median {ms:7.1f} ms   ({ms / medians['ours']:.2f} x ours)")
    zip_figures(labels, args.objects, args.pictures)


def zip_figures(labels: np.ndarray, objects: int, count: int) -> None:
    import io

    from ui.dataset_export import ExportObject, ExportPicture, write_dataset_zip

    height, width = labels.shape
    numbers = tuple(ExportObject(n, "object", 0.9) for n in range(1, objects + 1))
    pictures = [ExportPicture(f"p{k}.jpg", width, height, labels, numbers, None) for k in range(count)]
    out = io.BytesIO()
    start = time.perf_counter()
    summary = write_dataset_zip(pictures, out, max_bytes=1 << 40, deadline_s=3600)
    seconds = time.perf_counter() - start
    print(
        f"data set zip, {count} pictures: {seconds:.2f} s ({seconds / count * 1000:.0f} ms a picture), "
        f"{summary.bytes / 1e6:.1f} MB, {summary.objects} objects"
    )


if __name__ == "__main__":
    main()
