"""Felt latency of the page in real Chromium, side by side with the HTTP API on the same server.

    python benchmarks/browser_bench.py                 # ViT-B shape, CPU, 15 clicks per picture
    python benchmarks/browser_bench.py --shape tiny --reps 5

For each picture (800×600 and 12 MP, 4000×3000) the page is opened in Debian's Chromium (Playwright,
executable_path=/usr/bin/chromium), the picture uploaded, then, alternately, one click on the page and
one warm API call with the same prompt (POST /v1/images/segmentations, the same bytes, found again by
their digest). Measured in the browser: click → point drawn (next animation frame, no server round
trip) and click → new overlay painted (the answer's label map composited on the canvas). Prints
medians and ratios; writes benchmarks/results/browser-<shape>.json. Random weights of the requested
architecture: the compute is the published model's, the masks meaningless.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

_HF_HOME = tempfile.mkdtemp(prefix="samhq-bench-hf-")
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import base64  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402

import httpx  # noqa: E402

from benchmarks.browser_common import ARGS, CHROMIUM, median, picture  # noqa: E402

MODEL_ID = "syscv-community/sam-hq-vit-base"


def measure(page, http: httpx.Client, data: bytes, width: int, height: int, reps: int, tmp: Path) -> dict:
    path = tmp / f"picture-{width}x{height}.jpg"
    path.write_bytes(data)
    page.locator("#file").set_input_files(str(path))
    page.get_by_text("Picture ready").wait_for(timeout=600_000)
    b64 = base64.b64encode(data).decode()
    api_ms, paint_ms, point_ms = [], [], []
    http.post("/v1/images/segmentations", json={"model": MODEL_ID, "image_prompt": b64, "segment_prompt": [[[5, 5]]]})
    for i in range(reps):
        x, y = width * (0.2 + 0.6 * ((i * 7) % reps) / reps), height * (0.3 + 0.4 * ((i * 3) % reps) / reps)
        clicks = int(page.locator("#overlay").get_attribute("data-clicks"))
        box = page.locator("#points").bounding_box()
        page.mouse.click(box["x"] + (x + 0.5) * box["width"] / width, box["y"] + (y + 0.5) * box["height"] / height)
        page.wait_for_function(f"Number(document.querySelector('#overlay').dataset.clicks) > {clicks}")
        page.wait_for_function("window.samhq.timings.filter((t) => t.kind === 'overlay').length > " + str(i))
        timings = page.evaluate("window.samhq.timings")
        paint_ms.append([t for t in timings if t["kind"] == "overlay"][-1]["ms"])
        point_ms.append([t for t in timings if t["kind"] == "point"][-1]["ms"])
        points = page.evaluate("window.samhq.view.objects[0].points")
        start = time.perf_counter()
        response = http.post(
            "/v1/images/segmentations", json={"model": MODEL_ID, "image_prompt": b64, "segment_prompt": [points]}
        )
        api_ms.append((time.perf_counter() - start) * 1e3)
        assert response.status_code == 200, response.text
    page.locator("#clear-all").click()
    return {
        "picture": f"{width}x{height}",
        "api_warm_click_ms": median(api_ms),
        "click_to_overlay_painted_ms": median(paint_ms),
        "click_to_point_drawn_ms": median(point_ms),
        "target_ms": 1.5 * median(api_ms) + 60,
        "samples": {"api": api_ms, "paint": paint_ms, "point": point_ms},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="base", choices=["tiny", "base", "large", "huge"])
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args(argv)

    from live_server import LiveServer
    from playwright.sync_api import sync_playwright

    import app
    from segmentation.offline import install_in_hf_cache
    from segmentation.settings import Settings

    print(f"building a random {args.shape} SAM-HQ checkpoint ...", flush=True)
    install_in_hf_cache(_HF_HOME, MODEL_ID, "sam_hq", args.shape)
    settings = Settings(model=MODEL_ID, preload_examples=False, device="cpu")
    results = []
    tmp = Path(tempfile.mkdtemp(prefix="samhq-bench-pictures-"))
    try:
        with (
            LiveServer(app.build_app(settings)) as server,
            httpx.Client(base_url=server.url, timeout=600) as http,
            sync_playwright() as playwright,
        ):
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("dialog", lambda dialog: dialog.accept())
            page.set_default_timeout(120_000)
            page.goto(server.url)
            page.wait_for_selector("#samhq[data-ready='1']")
            for width, height in ((800, 600), (4000, 3000)):
                print(f"picture {width}x{height} ...", flush=True)
                results.append(measure(page, http, picture(width, height), width, height, args.reps, tmp))
            browser.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(_HF_HOME, ignore_errors=True)
    small, big = results
    print(f"\n{MODEL_ID} ({args.shape} shape), CPU, {args.reps} clicks per picture, medians:\n")
    print("| picture | API warm click | click → overlay painted | ratio | target (1.5×API+60) | click → point drawn |")
    print("|---|---|---|---|---|---|")
    for r in results:
        ratio = r["click_to_overlay_painted_ms"] / r["api_warm_click_ms"]
        print(
            f"| {r['picture']} | {r['api_warm_click_ms']:.0f} ms | {r['click_to_overlay_painted_ms']:.0f} ms | "
            f"{ratio:.2f}× | {r['target_ms']:.0f} ms | {r['click_to_point_drawn_ms']:.0f} ms |"
        )
    scale = big["click_to_overlay_painted_ms"] / small["click_to_overlay_painted_ms"]
    print(f"\n12 MP click ÷ 800×600 click (painted): {scale:.2f}×")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"browser-{args.shape}.json").write_text(json.dumps({"results": results, "scale_12mp": scale}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
