"""Segment everything, timed: 16×16 and 32×32 grids on a cached embedding, and a click's wait during a run.

    python benchmarks/everything_bench.py                 # ViT-B shape, CPU by default, 1500x1000 picture
    python benchmarks/everything_bench.py --shape tiny --reps 1

The checkpoint has ViT-B's architecture with random weights (the hub may be unreachable): the same compute as
the published model, meaningless masks. Random weights pass official's thresholds rarely, so each grid is timed
twice: with official's thresholds (0.88 / 0.95: the decoder's cost, few masks upscaled) and with both
thresholds at 0 (every point's mask upscaled to the picture's size and measured: the worst case). The click
scenario runs warm one-object clicks while a 16×16 run goes on and compares them with the same clicks alone.
The small-region clean-up (`min_mask_region_area`) is timed per mask on every mask of a small grid (thresholds 0,
no NMS; random weights make speckled masks: many components, its worst case), and the label map composed with
and without its edits.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# bench sets HF_HOME (a temporary cache) and offline mode before transformers is imported
from benchmarks.bench import _HF_HOME, MODEL_ID, ONE_OBJECT, environment, load_picture  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="base", choices=["base", "large", "huge", "tiny"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--picture", help="a picture file (default: assets/coffee.jpg resized to 1500x1000)")
    parser.add_argument("--reps", type=int, default=1, help="runs per grid (the median is printed)")
    parser.add_argument("--clicks", type=int, default=8)
    parser.add_argument("--grids", default="16,32", help="points_per_side values to time")
    parser.add_argument("--worst-case-up-to", type=int, default=16, help="largest grid also timed with thresholds 0")
    parser.add_argument("--min-area", type=int, default=100, help="min_mask_region_area of the clean-up's timing")
    parser.add_argument("--clean-up-grid", type=int, default=4, help="points_per_side of the clean-up's masks")
    args = parser.parse_args(argv)

    import shutil

    from segmentation import Segmenter
    from segmentation.everything import Cancelled, clean_up, compose_labels, generate
    from segmentation.everything_options import EverythingOptions
    from segmentation.offline import install_in_hf_cache

    try:
        print(f"building a random {args.shape} SAM-HQ checkpoint ...", flush=True)
        install_in_hf_cache(_HF_HOME, MODEL_ID, "sam_hq", args.shape)
        segmenter = Segmenter.from_pretrained(MODEL_ID, device=args.device)
        picture = load_picture(args.picture)
        embedding = segmenter.embed(picture)  # cached from here on: no run below encodes
        segmenter.segment(embedding, ONE_OBJECT)  # first-call overheads out of the measurements
        print(f"{MODEL_ID} ({args.shape}) on {segmenter.device}; picture {embedding.width}x{embedding.height}")
        print(environment(segmenter))
        rows = []
        for side in (int(v) for v in args.grids.split(",") if v):
            for label, knobs in (("official thresholds", {}), ("thresholds 0 (all measured)", {
                "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0})):  # fmt: skip
                if knobs and side > args.worst_case_up_to:
                    continue
                options = EverythingOptions(points_per_side=side, **knobs)
                times, result = [], None
                for _ in range(args.reps):
                    start = time.perf_counter()
                    result = generate(segmenter, embedding, options)
                    times.append(time.perf_counter() - start)
                t = result.timings
                row = (
                    f"| {side}×{side} | {label} | {statistics.median(times):.1f} s | {t['decoder']:.1f} s | "
                    f"{t['measure']:.1f} s | {t['everything'] / options.batches:.2f} s | {len(result.masks)} |"
                )
                rows.append(row)
                print(row, flush=True)

        every = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)  # every point's mask
        logits = generate(segmenter, embedding, EverythingOptions(points_per_side=args.clean_up_grid, **every)).logits
        clean_up_line = "small-region clean-up: no masks to time"
        if len(logits):
            sizes = (embedding.resized_size, embedding.original_size)
            start = time.perf_counter()
            regions = tuple(clean_up(logits, *sizes, args.min_area))
            cleaning = time.perf_counter() - start
            start = time.perf_counter()
            compose_labels(logits, (None,) * len(logits), *sizes)
            plain = time.perf_counter() - start
            start = time.perf_counter()
            compose_labels(logits, regions, *sizes)
            honoured = time.perf_counter() - start
            changed = sum(region is not None for region in regions)
            clean_up_line = (
                f"small-region clean-up (min_mask_region_area {args.min_area}) at {embedding.width}x"
                f"{embedding.height}: {cleaning / len(logits) * 1e3:.0f} ms a mask (upscale, holes, islands; "
                f"{changed} of {len(logits)} changed); label map {honoured / len(logits) * 1e3:.0f} ms a mask with "
                f"the edits vs {plain / len(logits) * 1e3:.0f} ms without"
            )
            print(clean_up_line, flush=True)

        # a click's wait while a 16×16 run goes on, against the same click alone
        alone = []
        for _ in range(args.clicks):
            start = time.perf_counter()
            segmenter.segment(embedding, ONE_OBJECT)
            alone.append(time.perf_counter() - start)
        options = EverythingOptions(points_per_side=16)
        batch_ends: list[float] = []
        first = threading.Event()

        def progress(report):
            batch_ends.append(time.perf_counter())
            first.set()

        stop = threading.Event()

        def run_until_stopped():
            try:
                generate(segmenter, embedding, options, progress=progress, cancelled=stop.is_set)
            except Cancelled:
                pass

        run = threading.Thread(target=run_until_stopped)
        run.start()
        first.wait()
        during, batches_waited = [], []
        for _ in range(args.clicks):
            if not run.is_alive():
                break
            before = len(batch_ends)
            start = time.perf_counter()
            segmenter.segment(embedding, ONE_OBJECT)
            during.append(time.perf_counter() - start)
            batches_waited.append(len(batch_ends) - before)
            time.sleep(0.2)  # let the run take its next batch
        stop.set()  # the clicks are measured: the rest of the run is not needed
        run.join()
        gaps = [b - a for a, b in zip(batch_ends, batch_ends[1:])] or [float("nan")]
        print()
        print("| grid | thresholds | run (median) | decoder | upscale + measure | per batch of 64 | masks kept |")
        print("|---|---|---:|---:|---:|---:|---:|")
        print("\n".join(rows))
        print()
        print(
            f"click alone: median {statistics.median(alone) * 1e3:.0f} ms; during a 16×16 run: median "
            f"{statistics.median(during) * 1e3:.0f} ms, max {max(during) * 1e3:.0f} ms over {len(during)} clicks; "
            f"batches finished meanwhile: max {max(batches_waited)}; a batch takes {statistics.median(gaps):.2f} s "
            f"(median)"
        )
        print(clean_up_line)
        return 0
    finally:
        shutil.rmtree(_HF_HOME, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
