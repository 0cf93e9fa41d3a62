"""What an edit on the page costs, over the page's own /ui routes (raw HTTP, as the browser sends them),
side by side in one run: a one-object click, a one-point edit on a 16-object picture, a no-op select there.

    python benchmarks/edit_cost.py                  # ViT-B shape (random weights), picture 1500x1000, CPU
    python benchmarks/edit_cost.py --shape tiny --reps 10

Every rep of the 16-object scenario selects object k (timed: the no-op), adds a point to it at a new place
(timed: the one-point edit), then undoes it (not timed); the one-object click adds a point at a new place
to a one-object session and undoes it. Medians and ratios go to stdout and benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # live_server

# bench sets HF_HOME (a temporary cache) and offline mode before transformers is imported
from benchmarks.bench import _HF_HOME, MODEL_ID, ROOT, load_picture  # noqa: E402

OBJECTS = 16


def timed(http, sid: str, **body) -> tuple[float, dict]:
    start = time.perf_counter()
    response = http.post(f"/ui/session/{sid}/op", json=body)
    seconds = time.perf_counter() - start
    if response.status_code != 200:
        raise RuntimeError(f"{body}: {response.status_code} {response.text[:300]}")
    return seconds, response.json()


def session(http, picture: bytes) -> str:
    sid = http.post("/ui/session").json()["session"]
    assert http.post(f"/ui/session/{sid}/picture", content=picture).status_code == 200
    timed(http, sid, op="embed")
    return sid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="base", choices=["tiny", "base"])
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()

    import httpx
    from live_server import LiveServer

    import app
    from segmentation.offline import install_in_hf_cache
    from segmentation.settings import Settings

    install_in_hf_cache(Path(_HF_HOME), MODEL_ID, "sam_hq", args.shape, seed=0, logit_gain=10000.0)
    application = app.build_app(Settings(model=MODEL_ID, preload_examples=False, device="cpu"))
    application.state.registry.get()
    picture = load_picture(None)  # bench.py's 1500x1000 photo
    one, edit, noop = [], [], []
    with LiveServer(application) as live, httpx.Client(base_url=live.url, timeout=600) as http:
        single = session(http, picture)
        timed(http, single, op="click", x=700, y=450)
        many = session(http, picture)
        for i in range(OBJECTS):
            if i:
                timed(http, many, op="new")
            timed(http, many, op="click", x=60 + 85 * i, y=200 + 40 * (i % 8))
        for rep in range(args.reps):
            seconds, _ = timed(http, single, op="click", x=400 + 7 * rep, y=300, include=False)
            one.append(seconds)
            timed(http, single, op="undo")
            number = 1 + rep % OBJECTS
            seconds, _ = timed(http, many, op="select", number=number)
            noop.append(seconds)
            seconds, view = timed(http, many, op="click", x=100 + 9 * rep, y=700, include=False)
            edit.append(seconds)
            timed(http, many, op="undo")
        status = view["status"]
    medians = {
        name: statistics.median(samples) * 1e3
        for name, samples in (
            ("one-object click", one),
            (f"one-point edit, {OBJECTS} objects", edit),
            (f"no-op select, {OBJECTS} objects", noop),
        )
    }
    base = medians["one-object click"]
    print(
        f"shape {args.shape}, picture 1500x1000, {args.reps} reps, torch threads {__import__('torch').get_num_threads()}"
    )
    print("| scenario (over /ui, raw HTTP) | median ms | ÷ one-object click |")
    print("|---|---:|---:|")
    for name, value in medians.items():
        print(f"| {name} | {value:.1f} | {value / base:.2f}× |")
    print(f"last edit's status line: {status}")
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"edit-cost-{args.shape}.json").write_text(json.dumps({"medians_ms": medians, "reps": args.reps}))


if __name__ == "__main__":
    main()
