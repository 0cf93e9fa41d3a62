"""Click latency, side by side in one process: the naive baseline, our cold click, our warm clicks, the HTTP API.

    python benchmarks/bench.py                      # ViT-B shape on the best device, writes benchmarks/results/
    python benchmarks/bench.py --shape large --device cpu --warm-reps 10
    python benchmarks/bench.py --only box           # just a box + 2 points against 3 points, warm

The checkpoint has the exact architecture of the requested size with random weights (the hub
may be unreachable): the same compute as the published model, meaningless masks. Results: a
JSON file, a markdown table (printed and saved) and a PNG chart of the per-stage breakdown.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

# huggingface_hub reads HF_HOME when imported: set it before anything imports transformers.
_HF_HOME = tempfile.mkdtemp(prefix="samhq-bench-hf-")
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_OFFLINE"] = "1"
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import base64  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

from PIL import Image  # noqa: E402

from benchmarks.report import chart, markdown_table  # noqa: E402

MODEL_ID = "syscv-community/sam-hq-vit-base"
ONE_OBJECT = [[[620.0, 410.0]]]
THREE_POINTS = [[[620.0, 410.0], [700.0, 450.0], [560.0, 380.0]]]
BOX_AND_TWO_POINTS = ([[[620.0, 410.0], [700.0, 450.0]]], [[1, 1]], [[450.0, 300.0, 820.0, 560.0]])
EIGHT_OBJECTS = [
    [[100.0 + 160 * i, 200.0 + 60 * (i % 3)]] + ([[130.0 + 160 * i, 260.0]] if i % 2 else []) for i in range(8)
]


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"median_ms": statistics.median(ordered) * 1e3, "p95_ms": p95 * 1e3, "n": len(ordered)}


def stage_summary(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    keys = {key for run in runs for key in run}
    return {key: summary([run.get(key, 0.0) for run in runs]) for key in sorted(keys)}


def load_picture(path: str | None) -> bytes:
    if path:
        return Path(path).read_bytes()
    photo = ROOT / "assets" / "coffee.jpg"
    image = Image.open(photo).convert("RGB") if photo.exists() else Image.new("RGB", (600, 400), (90, 120, 150))
    image = image.resize((1500, 1000))  # the picture size the CPU figures refer to
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def naive_click(segmenter, picture: bytes, prompt) -> dict[str, float]:
    """What most demos do per click: processor + full forward (encoder included) + post-processing."""
    import torch

    from segmentation.images import load_image
    from segmentation.masks import encode_png

    model, processor, device = segmenter.model, segmenter.loaded.processor, segmenter.device
    times: dict[str, float] = {}
    start = time.perf_counter()
    rgb = load_image(picture)
    times["decode_image"] = time.perf_counter() - start
    start = time.perf_counter()
    inputs = processor(images=rgb, input_points=[prompt], return_tensors="pt")
    times["preprocess"] = time.perf_counter() - start
    start = time.perf_counter()
    with torch.inference_mode():
        outputs = model(
            pixel_values=inputs["pixel_values"].to(device, segmenter.dtype),
            input_points=inputs["input_points"].to(device, segmenter.dtype),
            multimask_output=len(prompt[0]) == 1,
        )
    sync(device)
    times["encoder+decoder"] = time.perf_counter() - start
    start = time.perf_counter()
    masks = processor.post_process_masks(
        outputs.pred_masks.float().cpu(), inputs["original_sizes"], inputs["reshaped_input_sizes"], binarize=False
    )[0]
    best = masks[:, 0]
    labels = torch.where(best.max(0).values > 0, best.argmax(0) + 1, 0).to(torch.uint8).numpy()
    times["postprocess"] = time.perf_counter() - start
    start = time.perf_counter()
    encode_png(labels)
    times["png"] = time.perf_counter() - start
    return times


def cold_click(segmenter, picture: bytes, prompt) -> dict[str, float]:
    """A new picture: decode, embed (encoder), decode the prompt, post-process, PNG."""
    from segmentation.masks import encode_png

    segmenter.cache.clear()
    times: dict[str, float] = {}
    start = time.perf_counter()
    rgb = segmenter.prepare(picture)
    times["decode_image"] = time.perf_counter() - start
    start = time.perf_counter()
    key = segmenter.cache_key(rgb)
    times["hash"] = time.perf_counter() - start
    embedding, _ = segmenter.embed_with_info(rgb, key=key)
    times.update(embedding.timings)
    result = segmenter.segment(embedding, prompt)
    times.update(result.timings)
    start = time.perf_counter()
    encode_png(result.best.labels)
    times["png"] = time.perf_counter() - start
    return times


def warm_click(segmenter, key: str, prompt, labels=None, boxes=None) -> dict[str, float]:
    """A click on a picture the session already embedded: the UI's path (key kept in session state)."""
    from segmentation.masks import encode_png

    embedding = segmenter.cached(key)
    result = segmenter.segment(embedding, prompt, labels, boxes)
    times = dict(result.timings)
    start = time.perf_counter()
    encode_png(result.best.labels)
    times["png"] = time.perf_counter() - start
    return times


def http_clicks(segmenter, picture: bytes, prompt, reps: int) -> list[dict[str, float]] | None:
    """The same warm click through POST /v1/images/segmentations on a local server, end to end."""
    try:
        import httpx
        from fastapi import FastAPI

        from segmentation.api import install_api
        from segmentation.service import ModelRegistry
        from segmentation.settings import Settings
        from tests.live_server import LiveServer
    except ImportError as error:
        print(f"HTTP stage skipped: {error}")
        return None
    settings = Settings(model=segmenter.model_id, preload_examples=False)
    registry = ModelRegistry(settings, loader=lambda *a, **k: segmenter)
    app = FastAPI()
    install_api(app, registry, settings)
    body = {"model": segmenter.model_id, "image_prompt": base64.b64encode(picture).decode(), "segment_prompt": prompt}
    runs = []
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=600) as client:
        client.post("/v1/images/segmentations", json=body).raise_for_status()  # embeds (cold)
        for _ in range(reps):
            start = time.perf_counter()
            response = client.post("/v1/images/segmentations", json=body)
            response.raise_for_status()
            assert response.json()["usage"]["input_tokens_details"]["cached_tokens"] > 0
            runs.append({"http_total": time.perf_counter() - start})
    return runs


def environment(segmenter) -> dict[str, str]:
    import gradio
    import torch
    import transformers

    info = {
        "device": str(segmenter.device),
        "dtype": str(segmenter.dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gradio": gradio.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": str(torch.get_num_threads()),
    }
    if segmenter.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(segmenter.device)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="base", choices=["base", "large", "huge", "tiny"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--picture", help="a picture file (default: assets/coffee.jpg resized to 1500x1000)")
    parser.add_argument("--naive-reps", type=int, default=3)
    parser.add_argument("--cold-reps", type=int, default=3)
    parser.add_argument("--warm-reps", type=int, default=20)
    parser.add_argument("--no-http", action="store_true")
    parser.add_argument("--only", choices=["box"], help="box: only the warm box + 2 points vs 3 points comparison")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)

    import torch

    from segmentation import Segmenter
    from segmentation.offline import install_in_hf_cache

    try:
        print(f"building a random {args.shape} SAM-HQ checkpoint in {_HF_HOME} ...", flush=True)
        install_in_hf_cache(_HF_HOME, MODEL_ID, "sam_hq", args.shape)
        segmenter = Segmenter.from_pretrained(MODEL_ID, device=args.device, dtype=args.dtype)
        picture = load_picture(args.picture)
        width, height = Image.open(io.BytesIO(picture)).size
        print(f"{MODEL_ID} ({args.shape} shape) on {segmenter.device} {segmenter.dtype}; picture {width}x{height}")

        warmup_rgb = segmenter.prepare(picture)  # first-call overheads out of the measurements
        segmenter.segment(segmenter.embed(warmup_rgb), ONE_OBJECT)
        if segmenter.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(segmenter.device)

        scenarios: dict[str, list[dict[str, float]]] = {}
        if args.only is None:
            scenarios["naive (full forward per click)"] = [
                naive_click(segmenter, picture, ONE_OBJECT) for _ in range(args.naive_reps)
            ]
            scenarios["cold click (new picture)"] = [
                cold_click(segmenter, picture, ONE_OBJECT) for _ in range(args.cold_reps)
            ]
        embedding, _ = segmenter.embed_with_info(picture)
        if args.only is None:
            scenarios["warm click, 1 object"] = [
                warm_click(segmenter, embedding.key, ONE_OBJECT) for _ in range(args.warm_reps)
            ]
            scenarios["warm click, 8 objects"] = [
                warm_click(segmenter, embedding.key, EIGHT_OBJECTS) for _ in range(args.warm_reps)
            ]
        # a box costs two prompt tokens: box + 2 points against 3 points alone, alternated so load drift hits both
        three, boxed = [], []
        for _ in range(args.warm_reps):
            three.append(warm_click(segmenter, embedding.key, THREE_POINTS))
            boxed.append(warm_click(segmenter, embedding.key, *BOX_AND_TWO_POINTS))
        scenarios["warm click, 3 points"] = three
        scenarios["warm click, box + 2 points"] = boxed
        if not args.no_http and args.only is None:
            runs = http_clicks(segmenter, picture, ONE_OBJECT, args.warm_reps)
            if runs:
                scenarios["warm click over HTTP, 1 object"] = runs

        totals = {name: summary([sum(run.values()) for run in runs]) for name, runs in scenarios.items()}
        ratios = {
            "box + 2 points / 3 points": totals["warm click, box + 2 points"]["median_ms"]
            / totals["warm click, 3 points"]["median_ms"]
        }
        if args.only is None:
            warm = totals["warm click, 1 object"]["median_ms"]
            cold = totals["cold click (new picture)"]["median_ms"]
            naive = totals["naive (full forward per click)"]["median_ms"]
            ratios.update({"naive / warm": naive / warm, "cold / warm": cold / warm})
            if "warm click over HTTP, 1 object" in totals:
                http = totals["warm click over HTTP, 1 object"]["median_ms"]
                ratios.update({"naive / warm over HTTP": naive / http, "cold / warm over HTTP": cold / http})
        memory = {
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "cache_entry_mb": embedding.nbytes / 2**20,
        }
        if segmenter.device.type == "cuda":
            memory["peak_gpu_mb"] = torch.cuda.max_memory_allocated(segmenter.device) / 2**20
        report = {
            "model": MODEL_ID,
            "shape": args.shape,
            "picture": f"{width}x{height}",
            "environment": environment(segmenter),
            "totals": totals,
            "stages": {name: stage_summary(runs) for name, runs in scenarios.items()},
            "ratios": ratios,
            "memory": memory,
        }
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"bench-{segmenter.device.type}-{args.shape}" + (f"-{args.only}" if args.only else "")
        (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
        table = markdown_table(report)
        (out / f"{stem}.md").write_text(table)
        chart(report, out / f"{stem}.png")
        print(table)
        print(f"written: {out / stem}.json, .md, .png")
        return 0
    finally:
        shutil.rmtree(_HF_HOME, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
