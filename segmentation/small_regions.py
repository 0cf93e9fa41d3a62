"""Small regions of a mask: official SAM-HQ's `min_mask_region_area` clean-up, in numpy alone.

As `remove_small_regions` in SysCV/sam-hq's `segment_anything/utils/amg.py`: the connected components
(8-connectivity) of the mask's background ("holes") or of the mask ("islands") smaller than the area are
filled or removed; when every island is small, the largest stays. Official labels the components with
OpenCV's `connectedComponentsWithStats`; this module labels them itself, exactly (no OpenCV, no scipy in the
runtime): the mask's horizontal runs are joined where they touch in the next row (diagonals included), and a
vectorized union-find (each root hooked to its smallest neighbouring root, then paths compressed) gives
every run its component. Components are numbered as OpenCV's (block-based) labelling numbers them, in the
order of their first 2×2 block, so "the largest" on a tie is the same one. `tests/test_everything.py` checks the labels against
OpenCV's on random masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np


@dataclass(frozen=True)
class Runs:
    """The horizontal runs of True pixels of an (H, W) mask, in raster order; `end` exclusive."""

    row: np.ndarray
    start: np.ndarray
    end: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return self.end - self.start


def runs_of(mask: np.ndarray) -> Runs:
    height, width = mask.shape
    padded = np.zeros((height, width + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    steps = np.diff(padded, axis=1)  # +1 where a run starts, -1 one past its end (columns of the mask)
    row, start = np.nonzero(steps == 1)
    _, end = np.nonzero(steps == -1)
    return Runs(row.astype(np.int64), start.astype(np.int64), end.astype(np.int64))


def _touching_pairs(runs: Runs, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, b): run a in the row above run b, touching it with 8-connectivity (columns overlap or meet at a
    corner). Runs are sorted by (row, start) and disjoint within a row, so the runs of the row above that
    touch one run are a contiguous range, found by binary search on keys row·(W+2) + column."""
    stride = width + 2
    start_key = runs.row * stride + runs.start
    end_key = runs.row * stride + runs.end
    above = (runs.row - 1) * stride
    first = np.searchsorted(end_key, above + runs.start, side="left")  # the row above's runs ending at >= start
    last = np.searchsorted(start_key, above + runs.end, side="right")  # ... starting at <= end (a corner)
    counts = np.maximum(last - first, 0)
    b = np.repeat(np.arange(len(counts)), counts)
    offsets = np.arange(len(b)) - np.repeat(np.cumsum(counts) - counts, counts)
    a = np.repeat(first, counts) + offsets
    return a, b


def _roots(count: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Each run's component, named by its smallest run (a root is never above its members: parent <= self)."""
    parent = np.arange(count)
    while len(a):
        root_a, root_b = parent[a], parent[b]
        apart = root_a != root_b
        if not apart.any():
            break
        a, b, root_a, root_b = a[apart], b[apart], root_a[apart], root_b[apart]  # joined pairs stay joined
        np.minimum.at(parent, np.maximum(root_a, root_b), np.minimum(root_a, root_b))
        while True:  # compress: every run points at its root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    return parent


@dataclass(frozen=True)
class Components:
    runs: Runs
    label: np.ndarray  # (runs,) the component of each run, 0-based, in OpenCV's order
    sizes: np.ndarray  # (components,) pixels

    def paint(self, chosen: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """(H, W) bool: the pixels of the components where `chosen` (bool per component) is True."""
        picked = chosen[self.label]
        return paint_runs(self.runs.row[picked], self.runs.start[picked], self.runs.end[picked], shape)


def components(mask: np.ndarray) -> Components:
    """The 8-connected components of the True pixels of an (H, W) bool mask."""
    runs = runs_of(mask)
    a, b = _touching_pairs(runs, mask.shape[1])
    roots = _roots(len(runs.row), a, b)
    first_runs, label = np.unique(roots, return_inverse=True)
    label = label.reshape(-1)
    # OpenCV's order: by the first 2×2 block (rows of blocks, left to right) holding a pixel of the component.
    # Two components never share a block (its pixels are all 8-adjacent), so the keys are distinct.
    block = (runs.row // 2) * (mask.shape[1] // 2 + 1) + runs.start // 2
    first_block = np.full(len(first_runs), np.iinfo(np.int64).max)
    np.minimum.at(first_block, label, block)
    rank = np.empty(len(first_runs), dtype=np.int64)
    rank[np.argsort(first_block)] = np.arange(len(first_runs))
    label = rank[label]
    sizes = np.bincount(label, weights=runs.lengths, minlength=len(first_runs)).astype(np.int64)
    return Components(runs, label, sizes)


def paint_runs(row: np.ndarray, start: np.ndarray, end: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool, True on the runs: +1 where each starts, -1 one past its end, summed along the flat picture
    (one byte a pixel: the runs are disjoint, so the sum is 0 or 1; starts are distinct, and so are ends)."""
    height, width = shape
    size = height * width
    steps = np.zeros(size + 1, dtype=np.int8)
    steps[row * width + start] += 1
    steps[row * width + end] -= 1
    return np.cumsum(steps[:size], dtype=np.int8).astype(bool).reshape(shape)


def remove_small_regions(
    mask: np.ndarray, area_thresh: int, mode: Literal["holes", "islands"]
) -> tuple[np.ndarray, bool]:
    """(mask, changed), official's semantics: "holes" fills the background's components smaller than
    `area_thresh`; "islands" removes the mask's components smaller than it, keeping the largest when all are.
    `changed` is official's flag: True whenever a small component was found (even when, as for a mask that is
    one small island, the pixels stay the same)."""
    holes = mode == "holes"
    found = components(~mask if holes else mask)
    small = found.sizes < area_thresh
    if not small.any():
        return mask, False
    if holes:
        return mask | found.paint(small, mask.shape), True
    keep = ~small
    if not keep.any():
        keep[int(np.argmax(found.sizes))] = True  # ties: the first in raster order, as official with OpenCV
    return found.paint(keep, mask.shape), True


def clean_mask(mask: np.ndarray, min_area: int) -> tuple[np.ndarray, bool]:
    """Official's `postprocess_small_regions` for one mask: holes filled, then islands removed."""
    filled, holes_changed = remove_small_regions(mask, min_area, "holes")
    cleaned, islands_changed = remove_small_regions(filled, min_area, "islands")
    return cleaned, holes_changed or islands_changed


@dataclass(frozen=True)
class Region:
    """A cleaned mask at the picture's size, compactly: its pixels within its box, one bit each."""

    top: int
    left: int
    height: int
    width: int
    bits: bytes

    @classmethod
    def of(cls, mask: np.ndarray) -> Region:
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if not len(rows):
            return cls(0, 0, 0, 0, b"")
        top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        window = mask[top:bottom, left:right]
        return cls(top, left, bottom - top, right - left, np.packbits(window, axis=None).tobytes())

    def window(self) -> np.ndarray:
        """(height, width) bool: the mask within its box."""
        bits = np.unpackbits(np.frombuffer(self.bits, dtype=np.uint8), count=self.height * self.width)
        return bits.reshape(self.height, self.width).astype(bool)

    def box(self) -> tuple[int, int, int, int]:
        """x0, y0, x1, y1 inclusive; [0, 0, 0, 0] for an empty mask (official's `batched_mask_to_box`)."""
        if not self.height:
            return (0, 0, 0, 0)
        return (self.left, self.top, self.left + self.width - 1, self.top + self.height - 1)

    def area(self) -> int:
        return int(np.unpackbits(np.frombuffer(self.bits, dtype=np.uint8)).sum()) if self.bits else 0

    def to_mask(self, shape: tuple[int, int]) -> np.ndarray:
        mask = np.zeros(shape, dtype=bool)
        mask[self.top : self.top + self.height, self.left : self.left + self.width] = self.window()
        return mask
