"""The hover preview in real Chromium, side by side with the click it previews: both preview graphs in one run.

    python benchmarks/preview_bench.py                  # ViT-B shape, CPU, 800×600 picture, 12 points
    python benchmarks/preview_bench.py --shape tiny --points 4

Two servers of the same checkpoint in this process, one per preview graph (SAMHQ_UI_PREVIEW_GRAPH: `sam`, SAM's
tokens without the HQ mask, and `hq`, the full HQ answer a click gets), each with its page in Debian's Chromium
(Playwright, executable_path=/usr/bin/chromium), a picture uploaded and the preview turned on (#preview-toggle);
the two are measured point by point, interleaved, so both see the same machine load. For each point: the pointer moves there and rests; measured in
the browser, the time from the pointer's last move to the preview drawn (next animation frame); then a
click at the same place, its answer painted (click → overlay painted, the page's warm click round trip), and
the agreement of the preview's mask with the server's mask for that click (IoU at the page's preview size);
then Undo. Also: bytes per picture (the features, gzip on the wire and unpacked) and per model (the decoder
graph and its picture graph, once), and the one-off costs (graph export on the server, graphs loaded in the browser,
features fetched and unpacked, the picture graph run once per picture).
Random weights of the requested architecture (`--logit-gain` as the tests' checkpoints, so masks are neither
empty nor everything): the compute is the published model's, the masks meaningless. Prints medians; writes
benchmarks/results/preview-<shape>.json. With SAMHQ_UI_ISOLATE=1 in the environment the page is cross-origin
isolated and the worker uses wasm threads (up to 4, at most the machine's cores).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

# bench sets HF_HOME (a temporary cache) and offline mode before transformers is imported
import json  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402

import httpx  # noqa: E402

from benchmarks.bench import _HF_HOME, MODEL_ID, ROOT  # noqa: E402
from benchmarks.browser_common import ARGS, CHROMIUM, median, picture  # noqa: E402

# the preview's mask against the server's for the active object, both at the page's preview size
AGREEMENT = """() => {
  const S = window.samhq, P = S.previewState;
  const value = S.view.objects.find((o) => o.number === S.view.active).value;
  const last = window.previewBeforeClick, labels = S.labels.data, mask = last.mask;
  if (S.labels.width !== last.width || S.labels.height !== last.height) return null;
  let both = 0, either = 0, server = 0, preview = 0;
  for (let i = 0; i < mask.length; i++) {
    const a = mask[i] === 1, b = labels[i] === value;
    if (a && b) both++;
    if (a || b) either++;
    if (a) preview++;
    if (b) server++;
  }
  const points = S.view.objects.find((o) => o.number === S.view.active).points;
  return { iou: either ? both / either : 1, preview: preview / mask.length, server: server / mask.length, points,
    hovered: [last.x, last.y] };
}"""


def hover_and_click(page, x: float, y: float, width: int, height: int) -> dict:
    """Rest the pointer at (x, y) until the preview is drawn there, then click there and compare."""
    box = page.locator("#points").bounding_box()
    drawn = page.evaluate("window.samhq.previewState.timings.length")
    # whole CSS pixels, as a mouse gives them: a click's coordinates are whole, a move's may not be
    sx, sy = round(box["x"] + (x + 0.5) * box["width"] / width), round(box["y"] + (y + 0.5) * box["height"] / height)
    page.mouse.move(sx - 7, sy - 5)
    page.mouse.move(sx, sy)
    page.wait_for_function(f"window.samhq.previewState.timings.length > {drawn}")
    timing = page.evaluate("window.samhq.previewState.timings.at(-1)")
    page.evaluate("window.previewBeforeClick = window.samhq.previewState.last")
    clicks = int(page.locator("#overlay").get_attribute("data-clicks"))
    page.mouse.click(sx, sy)
    page.wait_for_function(
        f"Number(document.querySelector('#overlay').dataset.clicks) > {clicks} && !window.samhq.queue.length"
    )
    page.wait_for_function("window.samhq.timings.filter((t) => t.kind === 'overlay').length > 0")
    overlay = page.evaluate("window.samhq.timings.filter((t) => t.kind === 'overlay').at(-1)")
    agreement = page.evaluate(AGREEMENT)
    rev = page.evaluate("window.samhq.view.rev")
    page.locator("#undo").click()
    page.wait_for_function(f"window.samhq.view.rev > {rev} && !window.samhq.queue.length")
    if os.environ.get("PREVIEW_DEBUG"):
        print(
            page.evaluate(
                "({c: window.previewBeforeClick.coords, l: window.previewBeforeClick.labels, o: window.samhq.view.objects})"
            )
        )
    return {"preview": timing, "click_ms": overlay["ms"], "agreement": agreement}


GRAPHS = ("sam", "hq")  # SAMHQ_UI_PREVIEW_GRAPH: SAM's tokens only, the full HQ answer (the default)


def open_page(browser, url: str, path: Path) -> tuple:
    """A page of `url` with the picture uploaded and the preview on and ready; (page, its one-off figures)."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.on("dialog", lambda dialog: dialog.accept())
    page.set_default_timeout(900_000)
    page.goto(url)
    page.wait_for_selector("#samhq[data-ready='1']")
    page.locator("#file").set_input_files(str(path))
    page.get_by_text("Picture ready").wait_for()
    start = time.perf_counter()
    if not page.locator("#preview-toggle").is_checked():
        page.locator("#preview-toggle").check()
    page.wait_for_function(
        "window.samhq.previewState.state === 'ready' || /unavailable/.test(document.querySelector('#preview-state').textContent)"
    )
    state = page.locator("#preview-state").text_content()
    assert page.evaluate("window.samhq.previewState.state") == "ready", state
    return page, {
        "toggle_to_ready_s_incl_graph_export": time.perf_counter() - start,
        "loaded": page.evaluate("window.samhq.previewState.bytes"),
        "threads": page.evaluate("window.samhq.previewState.threads"),
        "isolated": page.evaluate("crossOriginIsolated"),
        "info": page.evaluate("window.samhq.previewState.info"),
    }


def wire_bytes(http: httpx.Client, url: str) -> int:
    with http.stream("GET", url, headers={"Accept-Encoding": "gzip"}) as wire:
        for _ in wire.iter_raw():
            pass
        return wire.num_bytes_downloaded


def load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def summary(graph: str, runs: list[dict], once: dict, features_wire: int) -> dict:
    ious = [r["agreement"]["iou"] for r in runs]
    loaded = once["loaded"]
    return {
        "graph": graph,
        "rest_to_preview_drawn_ms": median([r["preview"]["ms"] for r in runs]),
        "wasm_run_ms": median([r["preview"]["run"] for r in runs]),
        "upscale_ms": median([r["preview"]["upscale"] for r in runs]),
        "click_to_overlay_painted_ms": median([r["click_ms"] for r in runs]),
        "preview_before_click_share": sum(r["preview"]["ms"] < r["click_ms"] for r in runs) / len(runs),
        "preview_before_click_points": sum(r["preview"]["ms"] < r["click_ms"] for r in runs),
        "iou_median": median(ious),
        "iou_min": min(ious),
        "mask_fraction_server_median": median([r["agreement"]["server"] for r in runs]),
        "mask_fraction_preview_median": median([r["agreement"]["preview"] for r in runs]),
        "features_bytes_wire": features_wire,
        "features_bytes_unpacked": loaded.get("features"),
        "features_load_ms": loaded.get("featuresMs"),
        "decoder_graph_bytes": loaded.get("decoder"),  # both graphs: the decoder's and its picture graph
        "picture_graph_bytes": loaded.get("pictureGraph"),
        "picture_graph_run_ms": loaded.get("pictureMs"),  # once per picture, in the worker
        "decoder_load_ms": loaded.get("decoderMs"),
        "toggle_to_ready_s_incl_graph_export": once["toggle_to_ready_s_incl_graph_export"],
        "wasm_threads": once["threads"],
        "cross_origin_isolated": once["isolated"],
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="base", choices=["tiny", "base", "large", "huge"])
    parser.add_argument("--points", type=int, default=12)
    parser.add_argument("--size", default="800x600")
    parser.add_argument("--logit-gain", type=float, default=10000.0)
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))

    from live_server import LiveServer
    from playwright.sync_api import sync_playwright

    import app
    from segmentation.offline import install_in_hf_cache
    from segmentation.settings import Settings

    print(f"building a random {args.shape} SAM-HQ checkpoint ...", flush=True)
    install_in_hf_cache(_HF_HOME, MODEL_ID, "sam_hq", args.shape, logit_gain=args.logit_gain)
    settings = Settings(model=MODEL_ID, preload_examples=False, device="cpu")
    tmp = Path(tempfile.mkdtemp(prefix="samhq-bench-pictures-"))
    path = tmp / "picture.jpg"
    path.write_bytes(picture(width, height))
    applications = {}
    for graph in GRAPHS:  # one server per graph (the setting is read when the app is built), both in this run
        os.environ["SAMHQ_UI_PREVIEW_GRAPH"] = graph
        applications[graph] = app.build_app(settings)
    load_before = load()
    try:
        with (
            LiveServer(applications["sam"]) as sam_server,
            LiveServer(applications["hq"]) as hq_server,
            httpx.Client(timeout=600) as http,
            sync_playwright() as playwright,
        ):
            servers = {"sam": sam_server, "hq": hq_server}
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
            pages, once, features_wire = {}, {}, {}
            for graph in GRAPHS:
                pages[graph], once[graph] = open_page(browser, servers[graph].url, path)
                features_wire[graph] = wire_bytes(http, servers[graph].url + once[graph]["info"]["features"])
                assert once[graph]["info"]["graph"] == graph, once[graph]["info"]
            runs: dict[str, list[dict]] = {graph: [] for graph in GRAPHS}
            for i in range(args.points):  # the two previews interleaved point by point: the same load on both
                x = width * (0.15 + 0.7 * ((i * 5) % args.points) / args.points)
                y = height * (0.2 + 0.6 * ((i * 3) % args.points) / args.points)
                for graph in GRAPHS if i % 2 == 0 else GRAPHS[::-1]:
                    pages[graph].bring_to_front()
                    runs[graph].append(hover_and_click(pages[graph], round(x, 1), round(y, 1), width, height))
                    print(f"point {i + 1} {graph}: {runs[graph][-1]}", flush=True)
            browser.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(_HF_HOME, ignore_errors=True)
    results = {graph: summary(graph, runs[graph], once[graph], features_wire[graph]) for graph in GRAPHS}
    result = {
        "model": MODEL_ID,
        "shape": args.shape,
        "picture": f"{width}x{height}",
        "points": args.points,
        "load_average_before": load_before,
        "load_average_after": load(),
        "cpu_count": os.cpu_count(),
        **results,
    }
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"preview-{args.shape}.json").write_text(json.dumps(result, indent=1))
    print(
        f"\n{MODEL_ID} ({args.shape} shape), picture {width}x{height}, {args.points} points per graph, "
        f"load average {load_before} → {result['load_average_after']} on {os.cpu_count()} cores, medians:\n"
    )
    print(
        "| preview graph | pointer rests → preview drawn | of which wasm decoder | click → server answer painted "
        "| preview first | IoU with the click's answer, median / min | features per picture (gzip) "
        "| graphs per model (once) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for graph, r in results.items():
        print(
            f"| {graph} | {r['rest_to_preview_drawn_ms']:.0f} ms | {r['wasm_run_ms']:.0f} ms | "
            f"{r['click_to_overlay_painted_ms']:.0f} ms | {r['preview_before_click_points']} of {len(r['runs'])} | "
            f"{r['iou_median']:.3f} / {r['iou_min']:.3f} | {r['features_bytes_wire'] / 2**20:.2f} MB "
            f"({(r['features_bytes_unpacked'] or 0) / 2**20:.2f} MB unpacked) | "
            f"{(r['decoder_graph_bytes'] or 0) / 2**20:.1f} MB in all (of which the picture graph "
            f"{(r['picture_graph_bytes'] or 0) / 2**20:.1f} MB, run once per picture in {r['picture_graph_run_ms'] or 0:.0f} ms) |"
        )
    print(
        "\nwasm threads "
        + ", ".join(f"{g} {r['wasm_threads']} (isolated: {r['cross_origin_isolated']})" for g, r in results.items())
        + "; toggle → ready (graph export on first use included): "
        + ", ".join(f"{g} {r['toggle_to_ready_s_incl_graph_export']:.1f} s" for g, r in results.items())
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
