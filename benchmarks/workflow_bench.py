"""Moving to the next picture, timed: time to the first mask with and without the background prefetch.

    python benchmarks/workflow_bench.py                  # ViT-B shape, CPU, 1500x1000 pictures, 3 reps
    python benchmarks/workflow_bench.py --shape tiny --reps 1

The page (`app.build_app`) runs on loopback and is driven over raw HTTP as the browser drives it. Each rep is
a fresh session with two new pictures (distinct pixels, so no cache hit from an earlier rep): picture 1 is
embedded and clicked, then the person "labels" it for as long as the encoder needs (the bench waits until the
strip's listing says picture 2 is ready, or the same time without prefetch), then moves on: POST the switch,
the embedding (`op: embed`, as the page sends it when the switch says the picture is not embedded), one
click; the time from the switch to the click's answer (the first mask on screen) is what a person waits.
Side by side in one run: with the prefetch, and with it turned off (its `want` made a no-op). A third figure:
another visitor's warm clicks while a prefetch runs, against the same clicks idle (the prefetch takes its
one gate slot only once nobody waits, but it shares the CPU).

The checkpoint has ViT-B's architecture with random weights (the hub may be unreachable): the same compute as
the published model, meaningless masks.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# bench sets HF_HOME (a temporary cache) and offline mode before transformers is imported
from benchmarks.bench import _HF_HOME, MODEL_ID, load_picture  # noqa: E402


def _variant(picture: bytes, index: int) -> bytes:
    """The bench picture with its pixels shifted by `index` (a new pixel hash: a new embedding)."""
    import numpy as np
    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(picture)).convert("RGB")).astype(np.int16)
    rgb = np.clip(rgb + (index % 50) - 25, 0, 255).astype(np.uint8)
    rgb[0, 0] = [index % 256, index // 256 % 256, 7]
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="base", choices=["base", "large", "huge", "tiny"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--picture", help="a picture file (default: assets/coffee.jpg resized to 1500x1000)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--clicks", type=int, default=6, help="another visitor's clicks, idle and during a prefetch (0: skip)"
    )
    parser.add_argument(
        "--no-warmup", action="store_true", help="skip the warm-up rep (a loaded machine; biases 'with')"
    )
    args = parser.parse_args(argv)

    import shutil

    import httpx

    import app as app_module
    from segmentation.offline import install_in_hf_cache
    from segmentation.settings import Settings
    from tests.live_server import LiveServer

    try:
        print(f"building a random {args.shape} SAM-HQ checkpoint ...", flush=True)
        install_in_hf_cache(_HF_HOME, MODEL_ID, "sam_hq", args.shape)
        application = app_module.build_app(Settings(model=MODEL_ID, preload_examples=False, device=args.device))
        picture = load_picture(args.picture)
        with LiveServer(application) as live, httpx.Client(base_url=live.url, timeout=600) as http:
            routes = application.state.page
            prefetcher = routes.prefetcher
            want = prefetcher.want
            counter = iter(range(1, 10_000))
            centre = {"op": "click", "x": 620, "y": 410}

            def session(pictures: int) -> str:
                sid = http.post("/ui/session").json()["session"]
                for i in range(pictures):
                    query = f"?add=1&show={int(i == 0)}"
                    answer = http.post(f"/ui/session/{sid}/picture{query}", content=_variant(picture, next(counter)))
                    answer.raise_for_status()
                return sid

            def op(sid: str, body: dict) -> dict:
                answer = http.post(f"/ui/session/{sid}/op", json=body)
                answer.raise_for_status()
                return answer.json()

            def ready(sid: str, index: int) -> bool:
                return http.get(f"/ui/session/{sid}/pictures").json()["pictures"][index]["ready"]

            def next_picture(prefetch: bool) -> tuple[float, float]:
                """(seconds from the switch to the first mask on picture 2, seconds spent "labeling" picture 1)"""
                prefetcher.want = want if prefetch else (lambda *a, **k: None)
                sid = session(2)
                op(sid, {"op": "embed"})
                op(sid, centre)
                start = time.perf_counter()
                if prefetch:
                    while not ready(sid, 1):
                        time.sleep(0.02)
                else:
                    time.sleep(labeling.get("seconds", 0.0))
                labeled = time.perf_counter() - start
                start = time.perf_counter()
                view = http.post(f"/ui/session/{sid}/pictures/1").json()
                if not view["picture"]["embedded"]:
                    op(sid, {"op": "embed"})
                view = op(sid, centre)
                assert view["map"] is not None
                first_mask = time.perf_counter() - start
                http.delete(f"/ui/session/{sid}")
                return first_mask, labeled

            labeling: dict[str, float] = {}
            if not args.no_warmup:
                next_picture(True)  # warm-up: first-call overheads out of the figures
            rows: dict[str, list[float]] = {"with prefetch": [], "without prefetch": []}
            for _ in range(args.reps):
                seconds, labeled = next_picture(True)
                rows["with prefetch"].append(seconds)
                labeling["seconds"] = labeled  # the same time "labeling" without prefetch
                rows["without prefetch"].append(next_picture(False)[0])
            prefetcher.want = want

            # another visitor's warm clicks, idle and while a prefetch runs
            idle: list[float] = []
            during: list[float] = []
            other = session(1) if args.clicks else None

            def clicks() -> list[float]:
                times = []
                for i in range(args.clicks):
                    start = time.perf_counter()
                    op(other, {"op": "click", "x": 300 + 40 * i, "y": 300})
                    times.append(time.perf_counter() - start)
                    op(other, {"op": "undo"})
                return times

            if other is not None:
                op(other, {"op": "embed"})
                op(other, centre)
                idle = clicks()
                busy_sid = session(2)
                op(busy_sid, {"op": "embed"})  # its listing's next picture is now being prefetched
                while prefetcher.running(busy_sid) is None and not ready(busy_sid, 1):
                    time.sleep(0.005)
                during = clicks() if not ready(busy_sid, 1) else []

        def median_ms(values: list[float]) -> str:
            return f"{statistics.median(values) * 1e3:.0f} ms" if values else "n/a"

        print(f"\n{MODEL_ID} ({args.shape}) on {args.device}; {args.reps} rep(s); picture {len(picture)} bytes")
        print("| moving to the next picture (switch → first mask) | median | runs |")
        print("|---|---|---|")
        for name, values in rows.items():
            print(f"| {name} | {median_ms(values)} | {', '.join(f'{v:.2f} s' for v in values)} |")
        ratio = statistics.median(rows["without prefetch"]) / max(1e-9, statistics.median(rows["with prefetch"]))
        print(f"\nwithout / with prefetch: {ratio:.1f}×")
        print(f"time spent labeling picture 1 until the prefetch was ready (median): {labeling['seconds']:.2f} s")
        print("\n| another visitor's warm click | median | n |")
        print("|---|---|---|")
        print(f"| idle | {median_ms(idle)} | {len(idle)} |")
        print(f"| while a prefetch runs | {median_ms(during)} | {len(during)} |")
    finally:
        shutil.rmtree(_HF_HOME, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
